"""Headless Chromium for the tests: a screenshot of a static page, and a page driven over the DevTools protocol.

Tests that need the browser skip, with the reason, where Chromium (Debian's `chromium`) or `websockets` is missing.
`python tests/headless_chromium.py URL OUT.png` opens a running `dit-sparse app`, presses Generate with the page's
own settings and saves the page once the results are in (how `docs/app-screenshot.png` is made).
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest

WINDOW = (1400, 1000)


def chromium() -> str:
    """The Chromium executable; skips the calling test where there is none."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("headless Chromium is not installed (apt-get install chromium): the page was not rendered")
    return browser


def screenshot(url: str, png_path: str, window: tuple[int, int] = (1280, 2000)) -> None:
    """Chromium's own `--screenshot` of `url` (a file path is opened as file://); checks a page was drawn."""
    if "://" not in url:
        url = "file://" + os.path.abspath(url)
    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
    if os.path.exists(png_path):
        os.remove(png_path)
    command = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               f"--window-size={window[0]},{window[1]}", f"--screenshot={png_path}", url]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert os.path.getsize(png_path) > 10_000  # a rendered page, not a blank one


class Page:
    """One Chromium tab on `url`, driven over the DevTools protocol: `evaluate`, `wait_for`, `screenshot`."""

    def __init__(self, url: str, window: tuple[int, int] = WINDOW, timeout: float = 60):
        try:
            from websockets.sync.client import connect
        except ImportError:
            pytest.skip("the websockets package is not installed: the browser cannot be driven")
        self.profile = tempfile.mkdtemp(prefix="chromium-profile-")
        self.exits = contextlib.ExitStack()
        self.window = window
        self.process = subprocess.Popen(
            [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--mute-audio",
             "--remote-debugging-port=0", f"--user-data-dir={self.profile}",
             f"--window-size={window[0]},{window[1]}", url],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            port = self._devtools_port(timeout)
            targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10))
            page = next(t for t in targets if t["type"] == "page")
            self.socket = self.exits.enter_context(
                connect(page["webSocketDebuggerUrl"], max_size=2**28, open_timeout=timeout))
        except BaseException:
            self.close()
            raise
        self.ids = itertools.count(1)

    def _devtools_port(self, timeout: float) -> int:
        path = os.path.join(self.profile, "DevToolsActivePort")  # Chromium writes its port here
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if os.path.exists(path):
                with open(path) as file:
                    first = file.readline().strip()
                if first.isdigit():
                    return int(first)
            if self.process.poll() is not None:
                raise RuntimeError(f"chromium exited with status {self.process.returncode}")
            time.sleep(0.1)
        raise TimeoutError("chromium did not open its DevTools port")

    def send(self, method: str, **params) -> dict:
        """One DevTools command; returns its result (events in between are skipped)."""
        ident = next(self.ids)
        self.socket.send(json.dumps({"id": ident, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv(timeout=120))
            if message.get("id") == ident:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page."""
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 120, what: str = "") -> object:
        """Poll a JavaScript expression until it is truthy; returns its value."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.25)
        raise TimeoutError(f"waited {timeout} s for {what or expression}")

    def screenshot(self, png_path: str) -> None:
        """The whole page (the window's width, the content's height) as a PNG."""
        height = int(self.evaluate("document.documentElement.scrollHeight"))
        self.send("Emulation.setDeviceMetricsOverride", width=self.window[0], height=max(height, self.window[1]),
                  deviceScaleFactor=1, mobile=False)  # fmt: skip
        time.sleep(0.5)  # let the layout settle at the new size
        data = self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
        os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
        with open(png_path, "wb") as file:
            file.write(base64.b64decode(data))

    def close(self) -> None:
        self.exits.close()
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


#: JavaScript: the app's summary once a generation has finished (it then reports the speedup), else "".
APP_DONE = "(document.querySelector('#summary')?.innerText || '').includes('speedup') ? " \
           "document.querySelector('#summary').innerText : ''"  # fmt: skip


def set_number_inputs(page: Page, values: dict[str, float]) -> None:
    """Type values into the app's number inputs, by elem_id (`{"frames": 33}`), as a user would (input events)."""
    for elem_id, value in values.items():
        found = page.evaluate(
            f"(() => {{ const input = document.querySelector('#{elem_id} input'); if (!input) return false; "
            "Object.getOwnPropertyDescriptor(HTMLInputElement.prototype, 'value').set.call(input, "
            f"{json.dumps(str(value))}); "
            "for (const type of ['input', 'change', 'blur']) input.dispatchEvent(new Event(type, {bubbles: true})); "
            "return true; })()"
        )
        if not found:
            raise RuntimeError(f"the page has no number input #{elem_id}")


def generate_in_app(url: str, png_path: str, timeout: float = 300, settings: dict[str, float] | None = None) -> str:
    """Open the app at `url`, press Generate with the page's settings (`settings`: number inputs to change first, by
    elem_id), wait for both videos and the mask, save a screenshot of the page; returns the summary text."""
    with Page(url) as page:
        page.wait_for("!!document.querySelector('#generate')", timeout=60, what="the app's Generate button")
        set_number_inputs(page, settings or {})
        page.evaluate("document.querySelector('#generate').click()")
        summary = page.wait_for(APP_DONE, timeout=timeout, what="the generation's summary")
        page.wait_for("document.querySelectorAll('video').length >= 2", timeout=30, what="both videos")
        page.wait_for("[...document.querySelectorAll('video')].every(v => v.readyState >= 2)", timeout=30,
                      what="both videos' first frames")  # fmt: skip
        page.wait_for("!!document.querySelector('.gradio-container img, .gradio-container canvas, "
                      ".gradio-container svg.main-svg, [data-testid=\"matplotlib\"] img')", timeout=30,
                      what="the mask plot")  # fmt: skip
        page.evaluate("document.querySelectorAll('video').forEach(v => v.pause())")
        page.screenshot(png_path)
    return summary


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python tests/headless_chromium.py APP_URL OUT.png")
    print(generate_in_app(sys.argv[1], sys.argv[2]))

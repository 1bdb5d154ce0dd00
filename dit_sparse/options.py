"""The one option-value parser of every command and of `optimize`'s cache strings: `render --option`, `eval
--option`, the app's text boxes and `optimize(pipe, cache="first_block:threshold=0.1")` read values with it."""

from __future__ import annotations

import json


def parse_option_value(text: str):
    """A method option's value as `render --option`, `eval --option` and the app's text boxes give it: a JSON object
    or list as it reads (vdit's `pattern`), "a,b,c" as a tuple of such values (neighborhood's `window`, `tile`),
    true/false, an int, a float, else the string itself."""
    text = text.strip()
    if text.startswith(("{", "[")):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"option value {text!r} is not valid JSON: {exc.msg}") from exc
    if "," in text:
        return tuple(_parse_scalar(item.strip()) for item in text.strip("()[] ").split(","))
    return _parse_scalar(text)


def _parse_scalar(text: str):
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    return text

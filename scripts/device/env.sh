# Source at the start of a device call, from the repo root:  . scripts/device/env.sh [FA4_CHUNKS]
# Stages what a benchmark or GPU test needs on the device machine, idempotently (a warm machine keeps /tmp):
# - FA4: every carried chunk (.fa4/<i>/part.*, made by ../shared/tools/fa4-device.sh) is collected in /tmp/fa4; once
#   FA4_CHUNKS parts are there they are unpacked into /tmp/site (the calls carrying the chunks must follow each other
#   while the machine is warm);
# - the .whl wheels (../shared/tools/gpu-wheels.sh: diffusers) into /tmp/site, when carried;
# - this checkout, installed afresh into /tmp/pkg (the package-dir mapping of pyproject.toml needs an install).
# Then PYTHONPATH puts /tmp/pkg first and the checkout last (for `-m benchmarks.NAME`); run Python as `python3 -P`
# so that the checkout's dit_sparse/ folder does not shadow the installed package.
mkdir -p /tmp/fa4 /tmp/site
for part in .fa4/*/part.*; do [ -f "$part" ] && cp -n "$part" /tmp/fa4/; done
if [ -n "$1" ] && [ ! -d /tmp/site/flash_attn ]; then
  if [ "$(ls /tmp/fa4 | wc -l)" = "$1" ]; then cat /tmp/fa4/part.* | tar xJf - -C /tmp/site
  else echo "env.sh: $(ls /tmp/fa4 | wc -l) of $1 FA4 chunks on this machine (it went cold?): no FA4"; fi
fi
if [ ! -d /tmp/site/diffusers ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
rm -rf /tmp/pkg && python3 -m pip install -q --no-deps --no-build-isolation --no-compile --no-index --target /tmp/pkg . \
  >/tmp/pkg-install.log 2>&1 || cat /tmp/pkg-install.log
export PYTHONPATH=/tmp/pkg:/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:$PWD PYTHONUNBUFFERED=1
python3 -P -c "import torch, dit_sparse; print('env.sh:', torch.cuda.get_device_name(), 'torch', torch.__version__)"
python3 -P -c "import flash_attn.cute; print('env.sh: FA4 importable')" 2>/dev/null || echo "env.sh: no FA4"

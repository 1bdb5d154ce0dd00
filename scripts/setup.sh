#!/usr/bin/env bash
# Install dit-sparse (editable) into the current python3, with the test extra when called as `setup.sh test`.
# torch: an installed torch (a user's CUDA build) is left alone; with none installed, torch==2.13.0 is installed
# first (on the project's CPU machines pip takes that release's CPU build from local disk; elsewhere pip's default).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "setup: no torch found; installing torch==2.13.0"
  "$PY" -m pip install -q "torch==2.13.0"
fi
case "${1:-}" in
  "") extras="" ;;
  test) extras="[test]" ;;
  *) echo "setup: unknown argument '$1' (allowed: none, or 'test')" >&2; exit 2 ;;
esac
"$PY" -m pip install -q -e ".${extras}"
"$PY" -c "import dit_sparse, torch; print(f'setup: dit-sparse {dit_sparse.__version__} with torch {torch.__version__}')"

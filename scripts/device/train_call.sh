#!/bin/bash
# One `run` call on the device machine for the tiny model's training (pipelines/tiny/TRAINING_NOTES.md), from the repo root:
#   bash scripts/device/train_call.sh SECS MINUTES [tiny.train flags]   (carry [".whl", "runs"]; MINUTES an integer)
# Sets up a fresh machine, (re)starts the background run until MINUTES after the first call on this machine, watches
# its log for SECS, then copies the log and the checkpoint (split into 15 MB parts) to $OUT. Rejoin with cat ckpt.a?.
SECS=$1; MIN=$2; shift 2
T0=$(date +%s)
[ -f /tmp/end ] || echo $(( T0 + MIN * 60 )) > /tmp/end; END=$(cat /tmp/end)
[ -d /tmp/site/diffusers ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
[ -d /tmp/pkg/dit_sparse ] || pip install -q --no-deps --no-build-isolation --no-compile --no-index --target /tmp/pkg . 2>&1 | tail -2
cp scripts/device/train_background.sh /tmp/train_background.sh; [ -f /tmp/tiny.pt ] || cp runs/tiny.pt /tmp/tiny.pt
if pgrep -f train_background.sh >/dev/null; then echo "background run alive"; else echo "starting background run"; setsid nohup bash /tmp/train_background.sh $END "$@" >/dev/null 2>&1 < /dev/null & fi
while [ $(( $(date +%s) - T0 )) -lt $SECS ]; do sleep 20; grep -v "Warning\|rms_norm" /tmp/train.log | tail -1; grep -q "wrapper finished" /tmp/train.log && break; done
nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv
grep -v "Warning\|rms_norm" /tmp/train.log > $OUT/train.log
[ -f /tmp/tiny.pt ] && split -b 15M /tmp/tiny.pt $OUT/ckpt.
ls -la $OUT

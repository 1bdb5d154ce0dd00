#!/bin/bash
# One `run` call on the device machine that trains recipe variants of the tiny model side by side on its GPU, from
# the same checkpoint, and brings back the one whose direction words matter most (pipelines/tiny/TRAINING_NOTES.md):
#   bash scripts/device/ab_call.sh MINUTES "flags of variant 1" "flags of variant 2" ...   (carry [".whl", SRC])
# Each variant resumes $SRC (default runs/tiny.pt) with `--probe-every 1`; $OUT gets every variant's log, and the
# compact checkpoint (split into 15 MB parts: rejoin with cat ckpt.a?) of the variant with the largest last-probe gap
# between the opposite direction's flow loss and the true caption's. A call carries at most 64 MiB with the tracked
# files (about 26 MiB, most of it the shipped model), so point SRC at a compact checkpoint (19.5 MB; TRAINING_NOTES.md
# says how to get tiny_v4's back from the git history), overwritten in place between calls, and carry it with .whl;
# never a full checkpoint (47 MiB).
# SCORE="5 8" also exports the kept variant and scores its caption following at those CFG scales (about 30 s each),
# its card (the first) to $OUT.
MIN=$1; shift; SRC=${SRC:-runs/tiny.pt}
[ -d /tmp/site/diffusers ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
[ -d /tmp/pkg/dit_sparse ] || pip install -q --no-deps --no-build-isolation --no-compile --no-index --target /tmp/pkg . 2>&1 | tail -2
export PYTHONPATH=/tmp/pkg:/tmp/site PYTHONUNBUFFERED=1
i=0
for flags in "$@"; do
  i=$((i + 1)); cp $SRC /tmp/v$i.pt; echo "variant $i: $flags" > $OUT/v$i.log
  (cd /tmp && python3 -m dit_sparse.pipelines.tiny.train --checkpoint /tmp/v$i.pt --minutes $MIN --device cuda \
     --compile --save-every 100 --probe-every 1 --compact /tmp/v$i.compact.pt $flags 2>&1 | grep -v "Warning\|rms_norm" >> $OUT/v$i.log) &
done
while sleep 30; do for f in $OUT/v*.log; do echo "$(basename $f): $(tail -1 $f | cut -c1-150)"; done; jobs -r | grep -q . || break; done
nvidia-smi --query-gpu=memory.used --format=csv
python3 - "$i" <<'PY'
import sys, torch
gaps = {}
for i in range(1, int(sys.argv[1]) + 1):
    probes = [e for e in torch.load(f"/tmp/v{i}.pt", weights_only=False)["history"] if e["phase"] == "probe"]
    s = probes[-1]["sensitivity"] if probes else None
    gaps[i] = (s["opposite direction"] - s["true"]) / s["true"] if s else float("-inf")
    print(f"variant {i}: direction gap {gaps[i]:+.4%}", flush=True)
best = max(gaps, key=gaps.get)
print(f"keeping variant {best}")
open("/tmp/best", "w").write(str(best))
PY
split -b 15M /tmp/v$(cat /tmp/best).compact.pt $OUT/ckpt.
if [ -n "$SCORE" ]; then  # SCORE="5 8": export the kept variant and score its caption following at these CFG scales
  for g in $SCORE; do
    (cd /tmp && python3 -m dit_sparse.pipelines.tiny.train --checkpoint /tmp/v$(cat /tmp/best).pt --minutes 0 \
       --device cuda --export /tmp/export-$g --score-guidance $g 2>&1 | grep -v "Warning\|rms_norm" | tail -4)
  done
  cp /tmp/export-${SCORE%% *}/README.md $OUT/card.md
fi
ls -la $OUT

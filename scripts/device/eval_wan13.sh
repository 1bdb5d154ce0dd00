#!/bin/bash
# The GPU half of the eval (issue 7): every method against the baseline on a random-weight pipeline at Wan2.1-T2V-1.3B's
# real config, 81 frames of 480x832, 6 steps, bf16, on the device machine; brings back the report as $OUT/report.tgz
# (the side-by-sides as stills: --no-videos). About 5 minutes: 16 renders and 8 warm-ups of about 10 s, the frame
# metrics in one process per core. Stage FA4 first, in calls that follow each other while the machine is warm:
#   call 1, carry [".fa4/1", ".whl"]:  . scripts/device/env.sh 2
#   call 2, carry [".fa4/2", ".whl"]:  bash scripts/device/eval_wan13.sh
# Then unpack report.tgz under benchmarks/results/.
. scripts/device/env.sh 2
name=eval-wan13-random-h200-$(date +%F)
python3 -P -m dit_sparse.pipelines.tiny.random_wan --config wan2.1-1.3b --out /tmp/wan13-random --device cuda 2>&1 | tail -1
python3 -P -m dit_sparse eval --model /tmp/wan13-random --suite benchmarks/wan13_eval_prompts.txt --frames 81 \
  --height 480 --width 832 --steps 6 --device cuda --dtype bfloat16 --no-videos --output-dir /tmp/$name \
  --cache-dir /tmp/eval-wan13-cache > $OUT/eval.log 2>&1
tr '\r' '\n' < $OUT/eval.log | grep -v "it/s\]$" | tail -16
tar czf $OUT/report.tgz -C /tmp "$name" && ls -la $OUT

#!/bin/bash
# Used by train_call.sh: keep one background training run of the tiny model alive; args: END_EPOCH [flags]
END=$1; shift
export PYTHONPATH=/tmp/pkg:/tmp/site PYTHONUNBUFFERED=1
cd /tmp
while true; do
  REM=$(python3 -c "import time;print(round(($END-time.time())/60,2))")
  python3 -c "import sys;sys.exit(0 if $REM>0.6 else 1)" || break
  grep -q "(done)" /tmp/train.log 2>/dev/null && break
  if [ ! -f /tmp/nocompile ]; then
    python3 -m dit_sparse.pipelines.tiny.train --checkpoint /tmp/tiny.pt --minutes $REM --device cuda --compile --save-every 1.5 "$@" >> /tmp/train.log 2>&1 && break
    echo "=== compile run failed rc $?: eager from now" >> /tmp/train.log; touch /tmp/nocompile
  else
    python3 -m dit_sparse.pipelines.tiny.train --checkpoint /tmp/tiny.pt --minutes $REM --device cuda --save-every 1.5 "$@" >> /tmp/train.log 2>&1 && break
    echo "=== eager run failed rc $?" >> /tmp/train.log; sleep 5
  fi
done
echo "=== wrapper finished" >> /tmp/train.log

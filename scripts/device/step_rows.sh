#!/bin/bash
# Rows of benchmarks/transformer_step.py in one device call, resumable across calls (issue 9's compiled rows take
# minutes each at the real sizes):
#   bash scripts/device/step_rows.sh LIMIT_S ARGS...        e.g.  bash scripts/device/step_rows.sh 560 \
#       --models wan14 --modes regional --methods radial neighborhood --warmup 1 --repeats 2
# (`--modes regional` compiles one block per block class; `compiled`, the whole transformer, takes minutes a row)
# Carry [".whl"] (and the FA4 chunks as for env.sh on a cold machine). The day's results file, when the checkout has
# it under benchmarks/results/, goes into $OUT first and the run adds to it with --resume: each row is saved as soon
# as it is timed, and the run stops LIMIT_S - 40 seconds in (below the call's limit, so what is in $OUT comes back).
# Copy $OUT's transformer_step-*.json/.md into benchmarks/results/ before the next call; it then times only the rows
# still missing, against the baselines already in the file.
limit=$1; shift
. scripts/device/env.sh 2 > /tmp/env.log 2>&1 || cat /tmp/env.log
grep -h "env.sh:" /tmp/env.log
# The day's files of every GPU (the script names them; the run adds to its own GPU's and leaves the others as they are).
cp benchmarks/results/transformer_step-*-$(date +%F).json $OUT/ 2>/dev/null && echo "resuming from:" $(ls $OUT)
timeout $((limit - 40)) python3 -P benchmarks/transformer_step.py "$@" --resume --out $OUT 2>&1 \
  | grep -E "^==|^ +(eager|compiled|regional) |Error|error:" | tail -40
ls $OUT

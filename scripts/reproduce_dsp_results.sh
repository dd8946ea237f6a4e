#!/usr/bin/env bash
# The DSP results of docs/results.md: fine-tune, then DSP pipelined and joint at k = 12, 24, 36.
# Finished runs are skipped (their output folders hold results.json).
set -euo pipefail
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
OUT=${OUT:-runs/results}
CFG=configs/rotten-tomatoes.yaml
run() { [ -f "$1/results.json" ] && echo "done: $1" || "${@:2}" --output-dir "$1"; }
run $OUT/finetune headprune finetune --config $CFG
for k in 12 24 36; do
  run $OUT/dsp-pipelined-k$k headprune prune --config $CFG --mode pipelined --k $k --model $OUT/finetune/model
  run $OUT/dsp-joint-k$k headprune prune --config $CFG --mode joint --k $k
done
python - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
for f in sorted(out.glob("*/results.json")):
    r = json.loads(f.read_text())
    metric = r.get("metrics_pruned", r.get("metrics"))["validation"]
    unpruned = r.get("metrics_unpruned", {}).get("validation", "")
    print(f"{f.parent.name:20s} k={r.get('k', 72):>3} acc={metric:.4f} unpruned={unpruned} seconds={r['seconds']}")
PY

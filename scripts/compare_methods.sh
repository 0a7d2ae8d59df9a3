#!/usr/bin/env bash
# The data-quality comparison in the README: DOMINO vs plain soft prompt vs few-shot vs zero-shot on
# the HumanEval reference split with the embedded backbone, the same sample budget and sampling
# settings (experiment=demo_synthesize) for every method. Reuses the DOMINO run and samples of
# `make demo` (DEMO_DIR); the soft prompt is trained with the very same config (experiment=demo).
# Finished steps are skipped, so a rerun continues.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEMO=${DEMO_DIR:-lightning_logs/demo}
OUT=${COMPARE_DIR:-lightning_logs/compare}
N=${N:-64}
mkdir -p "$OUT"
[[ -e $DEMO/train/domain_prompt.safetensors ]] || { echo "run make demo first (needs $DEMO/train)"; exit 1; }

[[ -e $OUT/train_soft_prompt/domain_prompt.safetensors ]] || \
  "$PY" train.py experiment=demo method=soft_prompt hydra.run.dir="$OUT/train_soft_prompt"

for m in domino soft_prompt few_shot zero_shot; do
  case $m in
    domino) ck=(ckpt="$DEMO/train/domain_prompt.safetensors") ;;
    soft_prompt) ck=(ckpt="$OUT/train_soft_prompt/domain_prompt.safetensors") ;;
    *) ck=() ;;
  esac
  "$PY" synthesize.py experiment=demo_synthesize method=$m "${ck[@]}" n="$N" output_dir="$OUT/samples_$m"
done

"$PY" evaluate.py task=data_quality references="$DEMO/train/references.jsonl" \
  heldout="$DEMO/train/heldout.jsonl" hydra.run.dir="$OUT/data_quality" \
  "samples={domino: $OUT/samples_domino/samples.jsonl, soft_prompt: $OUT/samples_soft_prompt/samples.jsonl, few_shot: $OUT/samples_few_shot/samples.jsonl, zero_shot: $OUT/samples_zero_shot/samples.jsonl}"
cat "$OUT/data_quality/data_quality.md"

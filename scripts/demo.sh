#!/usr/bin/env bash
# `make demo`: the whole pipeline on the embedded default (Qwen2.5-Coder-0.5B-Instruct, HumanEval split),
# as the stages' entry points with their demo* experiment configs, then DOMINO vs a plain soft prompt
# (same config, same sampling) on alignment and memorisation, then a summary table.
#
# A stage whose output already exists is skipped (synthesis also resumes inside its run), so
# rerunning after a crash or Ctrl-C continues where it stopped; `rm -r $DEMO_DIR` starts over.
#   DEMO_DIR           where everything goes (default lightning_logs/demo)
#   DEMO_ARGS          extra overrides for every stage (e.g. backbone=tiny)
#   DEMO_TRAIN_ARGS DEMO_SYNTH_ARGS DEMO_FINETUNE_ARGS DEMO_EVAL_ARGS DEMO_QUALITY_ARGS   per-stage overrides
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${DEMO_DIR:-lightning_logs/demo}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
read -r -a ALL <<< "${DEMO_ARGS:-}"
read -r -a TRAIN <<< "${DEMO_TRAIN_ARGS:-}"
read -r -a SYNTH <<< "${DEMO_SYNTH_ARGS:-}"
read -r -a FT <<< "${DEMO_FINETUNE_ARGS:-}"
read -r -a EVAL <<< "${DEMO_EVAL_ARGS:-}"
read -r -a QUALITY <<< "${DEMO_QUALITY_ARGS:-}"

stage() {  # stage NAME OUTPUT_THAT_MEANS_DONE COMMAND...
  local name=$1 done=$2
  shift 2
  if [[ -e $done ]]; then
    echo "== $name: already done ($done)"
    return
  fi
  echo "== $name: $*"
  local t0 t1
  t0=$(date +%s)
  "$@"
  t1=$(date +%s)
  printf '%s\t%s\n' "$name" "$((t1 - t0))" >> "$OUT/timings.tsv"
}

stage train "$OUT/train/domain_prompt.safetensors" \
  "$PY" train.py experiment=demo hydra.run.dir="$OUT/train" "${ALL[@]}" "${TRAIN[@]}"
stage synthesize+curate "$OUT/synthesize/sft.jsonl" \
  "$PY" synthesize.py experiment=demo_synthesize ckpt="$OUT/train/domain_prompt.safetensors" curate=true \
  output_dir="$OUT/synthesize" "${ALL[@]}" "${SYNTH[@]}"
stage finetune "$OUT/finetune/adapter/adapter_config.json" \
  "$PY" finetune.py experiment=demo_finetune data="$OUT/synthesize/sft.jsonl" hydra.run.dir="$OUT/finetune" \
  "${ALL[@]}" "${FT[@]}"
stage evaluate-base "$OUT/eval_base/summary.json" \
  "$PY" evaluate.py experiment=demo_evaluate benchmark.path="$OUT/train/heldout.jsonl" \
  hydra.run.dir="$OUT/eval_base" "${ALL[@]}" "${EVAL[@]}"
stage evaluate-finetuned "$OUT/eval_finetuned/summary.json" \
  "$PY" evaluate.py experiment=demo_evaluate \
  adapter="$OUT/finetune/adapter" hydra.run.dir="$OUT/eval_finetuned" "${ALL[@]}" "${EVAL[@]}"   # held-out split from lineage.json

# the comparison that matters at this scale: the same config trained as a plain soft prompt, the
# same sampling, then both sample sets side by side on alignment and memorisation
compare() {
  "$PY" synthesize.py experiment=demo_synthesize \
    ckpt="$OUT/train_soft_prompt/domain_prompt.safetensors" output_dir="$OUT/sample_soft_prompt" "${ALL[@]}" "${SYNTH[@]}"
  "$PY" data_quality.py references="$OUT/train/references.jsonl" hydra.run.dir="$OUT/compare" \
    "samples={domino: $OUT/synthesize/samples.jsonl, soft_prompt: $OUT/sample_soft_prompt/samples.jsonl}" \
    "${ALL[@]}" "${QUALITY[@]}"
}
stage train-soft-prompt "$OUT/train_soft_prompt/domain_prompt.safetensors" \
  "$PY" train.py experiment=demo objective=soft_prompt hydra.run.dir="$OUT/train_soft_prompt" "${ALL[@]}" "${TRAIN[@]}"
stage compare "$OUT/compare/data_quality.json" compare

"$PY" scripts/demo_report.py "$OUT"

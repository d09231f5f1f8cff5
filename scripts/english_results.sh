#!/usr/bin/env bash
# The English results of docs/results/README.md and docs/results/english/, on a machine with two GPUs: the corrected
# recipe (CORRECTED_CONFIG: configs/english-124m.yaml, the best measured, Muon since 2026-12-03; the table was first
# made with configs/english-124m-adamw.yaml) and the seed article's (configs/seed-3090.yaml pointed at the same
# corpus, the same token budget) trained side by side, one GPU each; then SFT and LoRA of the corrected base
# beside both bases' scripts/compare.py, and last the benchmark of the corrected run's settings.
# CORRECTED_FLAGS adds flags to the corrected run (--save_every 0 saves its checkpoints' 20 s), SEED_FLAGS to the seed
# one. The seed run alone takes ~10 minutes of training on an H200, more than one ten-minute call of a lent machine:
# SEED_STOP_AFTER=S stops it after S seconds with a checkpoint (SIGTERM), and the same command with
# SEED_FLAGS=--resume, on the same machine, continues it exactly and goes on to the comparison.
#
#   data/ laid out as docs/results/english/README.md (The data) says: english/, gpt2-tokenizer/,
#   instruction-data.json, eval/{hellaswag_val.jsonl.xz,lambada_test.jsonl,wiki.test.raw}, verdict/the-verdict.txt; then
#   bash scripts/english_results.sh runs/english-results
set -u
R=${1:-runs/english-results}
mkdir -p "$R"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
L="accelerate launch --config_file accelerate_config.yaml"
step() { echo "== $(date -u +%H:%M:%S) $*"; }
CORRECTED_CONFIG=${CORRECTED_CONFIG:-configs/english-124m.yaml}

corrected() {
  export CUDA_VISIBLE_DEVICES=0
  step pretrain corrected
  $L scripts/pretrain.py --config "$CORRECTED_CONFIG" --output_dir runs/english-124m ${CORRECTED_FLAGS:-}
}

adapt() {  # SFT and LoRA of the corrected base: small runs, beside the comparison on the same GPU
  export CUDA_VISIBLE_DEVICES=0
  [ -d runs/english-124m/final ] || return 0
  step sft
  # The recipe in bf16; if it diverges (the engine stops with one line), once more in float32.
  $L scripts/sft.py --config configs/sft.yaml --model runs/english-124m/final --dataset data/instruction-data.json \
      --output_dir runs/english-sft \
    || $L scripts/sft.py --config configs/sft.yaml --model runs/english-124m/final --dataset data/instruction-data.json \
      --output_dir runs/english-sft-fp32 --mixed_precision no
  step lora
  $L scripts/lora.py --config configs/lora.yaml --model runs/english-124m/final --dataset data/verdict/the-verdict.txt \
      --split_paragraphs true --epochs 10 --learning_rate 1e-3 --output_dir runs/english-verdict
}

seed() {
  export CUDA_VISIBLE_DEVICES=${SEED_GPU:-1}
  step pretrain seed
  # The article's recipe, the same corpus and token budget; compiled only for speed (the same arithmetic),
  # evaluated every 1,067 steps = 6.6M tokens, as the corrected run every 100 steps.
  # SIGTERM straight to the engine (not through accelerate launch, which may kill it before its checkpoint is written).
  local launch=($L)
  [ -n "${SEED_STOP_AFTER:-}" ] && launch=(timeout -s TERM "$SEED_STOP_AFTER" python3)
  "${launch[@]}" scripts/pretrain.py --config configs/seed-3090.yaml --dataset data/english --tokenizer data/gpt2-tokenizer \
      --max_tokens 104857600 --compile true --eval_every 1067 --eval_batches 0 --save_every 0 \
      --output_dir runs/seed-english ${SEED_FLAGS:-}
}

# PARTS=corrected (or seed) runs one half alone, on GPU 0 of a one-GPU machine; the comparison then scores the
# final models that exist.
case ${PARTS:-both} in
  both) corrected > "$R/corrected.log" 2>&1 & seed > "$R/seed.log" 2>&1 & wait;;
  corrected) corrected > "$R/corrected.log" 2>&1;;
  seed) SEED_GPU=0 seed >> "$R/seed.log" 2>&1 ||  # appends: a resumed run continues its log
    { echo "the seed run did not finish (stopped? continue it with SEED_FLAGS=--resume): $R/seed.log" >&2; exit 1; };;
  *) echo "PARTS must be both, corrected or seed" >&2; exit 2;;
esac
models=(); for m in runs/english-124m/final runs/seed-english/final; do [ -d "$m" ] && models+=("$m"); done
[ ${#models[@]} -gt 0 ] || { echo "no final model to compare (a run stopped? continue it with --resume)" >&2; exit 1; }
adapt > "$R/adapt.log" 2>&1 &
step compare >> "$R/corrected.log"
CUDA_VISIBLE_DEVICES=0 python3 scripts/compare.py "${models[@]}" \
    --dataset data/english/validation.parquet --max_documents 1000 --hellaswag data/eval/hellaswag_val.jsonl.xz \
    --lambada data/eval/lambada_test.jsonl --wikitext data/eval/wiki.test.raw --batch_size 32 \
    --output_dir "$R/compare" > "$R/compare.log" 2>&1
wait  # for SFT and LoRA
# Last, as the least needed: the benchmark of the corrected run's settings, to set its tokens/s beside.
if [ -d runs/english-124m/final ]; then
  step benchmark, the same settings: real data, then random tokens >> "$R/corrected.log"
  python3 scripts/benchmark.py --config "$CORRECTED_CONFIG" --benchmark_data config --output_dir /tmp/bench-config \
    >> "$R/corrected.log" 2>&1
  python3 scripts/benchmark.py --config "$CORRECTED_CONFIG" --benchmark_data random --output_dir /tmp/bench-random \
    >> "$R/corrected.log" 2>&1
fi
step done >> "$R/corrected.log"
touch "$R/DONE"

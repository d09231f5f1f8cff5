#!/usr/bin/env bash
# Muon on GPT-2's exact architecture against the AdamW parity runs of docs/results/mixing.md: the engine with
# configs/english-124m-muon.yaml (400 steps x 65,536 tokens of the English corpus, Muon 0.02 for the hidden
# matrices, AdamW 1.5e-3 for the rest, warmup 80 steps), query, key and value orthogonalised apart (two seeds) and
# as one matrix, one after another on one GPU (each run's training seconds are its own); every final model scored
# by scripts/compare.py as the parity runs are.
#
#   bash scripts/muon_bench.sh runs/muon
set -euo pipefail
out=${1:-runs/muon}
mkdir -p "$out"
engine() {  # NAME FLAGS...
  local name=$1; shift
  python scripts/pretrain.py --config configs/english-124m-muon.yaml --output_dir "$out/$name" --sample_prompts "$@" \
    > "$out/$name.log" 2>&1
}
# One after another: side by side, two of three runs stopped with "CUDA error: unspecified launch failure" (2026-12-02).
engine muon-split --seed 1337 || echo "muon-split failed: $out/muon-split.log"
engine muon-split-seed2 --seed 2 || echo "muon-split-seed2 failed: $out/muon-split-seed2.log"
engine muon-one-qkv --seed 1337 --muon_split_qkv false || echo "muon-one-qkv failed: $out/muon-one-qkv.log"
for f in "$out"/*/summary.json; do
  python -c "import json,sys; s=json.load(open(sys.argv[1])); print(sys.argv[1], 'engine val_loss', round(s['eval']['val_loss'], 4), 'train_s', round(s['train_time_s']))" "$f"
done
models=(); for m in muon-split muon-split-seed2 muon-one-qkv; do [ -d "$out/$m/final" ] && models+=("$out/$m/final"); done
python scripts/compare.py "${models[@]}" --tasks text,wikitext --dataset data/english/validation.parquet \
  --max_documents 1000 --wikitext data/eval/wiki.test.raw --output_dir "$out/compare" | tail -12
python scripts/compare.py "${models[@]}" --tasks text --dataset data/eval/tinyshakespeare.txt \
  --output_dir "$out/compare-shakespeare" | tail -10

#!/usr/bin/env bash
# What the engine learns per token against the plain loop (scripts/plain_loop.py): GPT-2 124M on the English
# corpus, 400 steps x 65,536 tokens (26.2M, about one pass), AdamW 1.5e-3, warmup 80 steps, cosine to 10%, one GPU. The runs of
# a group share the GPU side by side: their validation losses are the result, not their speed. Every final
# model is then scored by one evaluation, scripts/compare.py (English validation documents, WikiText-2, tiny
# Shakespeare), and each engine run's own val_loss is printed beside it. docs/results/mixing.md has the results.
#
#   bash scripts/mixing_bench.sh runs/mixing parity         # the plain loop, the engine with document masking on and off
#   bash scripts/mixing_bench.sh runs/mixing warmup seeds   # warmup 20, 40, 160 (80 is parity's); parity's engine
#                                                           # runs with seed 2: groups run side by side
#   bash scripts/mixing_bench.sh runs/mixing seed:3 plain:2 # parity's three runs with seed 3; the plain loop with seed 2
#   ENGINE_FLAGS='--shuffle_rows 32768' bash scripts/mixing_bench.sh runs/big engine:2 engine:3
#                                                           # the engine's two runs with seeds 2 and 3, a flag changed
#   bash scripts/mixing_bench.sh runs/mask plainmask:0 flex:2   # the plain loop with document masking of its own
#                                                           # (seed 0); the engine's masking through flex attention
#   bash scripts/mixing_bench.sh runs/pairs plainmask:6 masked:6 plainmask:7 masked:7   # masked pairs, four at a time
#   ENGINE_FLAGS='--shuffle_rows 32768' bash scripts/mixing_bench.sh runs/b masked:4 masked:5 masked:6 masked:7
#                                                           # masked engine runs drawing from the whole corpus
#   bash scripts/mixing_bench.sh runs/k plainmask:6 sdpamask:6 plainmask:7 sdpamask:7   # masked parity in one call:
#                                                           # the engine's mask, dense, through the plain loop's kernel (sdpa)
#   bash scripts/mixing_bench.sh runs/muon muon:2 engine:2    # Muon (english-124m.yaml's settings) beside its
#                                                           # AdamW yardstick, the same seed; muonone:N: QKV as one
#
# Reads data/english (train-*.parquet + validation.parquet), data/gpt2-tokenizer and data/eval (wiki.test.raw,
# tinyshakespeare.txt): docs/results/english/README.md says where they come from.
set -euo pipefail
out=${1:-runs/mixing}
mkdir -p "$out"
run=(--config configs/english-124m-adamw.yaml --tokens_per_step 65536 --max_tokens 26214400 --learning_rate 1.5e-3
     --document_masking true --attn_implementation varlen --eval_every 0 --save_every 0 --sample_prompts --warmup_ratio 0 ${ENGINE_FLAGS:-})

engine() {  # NAME FLAGS...: one engine run, its log beside its folder
  local name=$1; shift
  python scripts/pretrain.py "${run[@]}" --output_dir "$out/$name" "$@" > "$out/$name.log" 2>&1
}

models=()
for what in "${@:2}"; do  # every group's runs side by side
  case $what in
    parity)
      python scripts/plain_loop.py data/english data/gpt2-tokenizer --steps 400 --warmup_steps 80 \
        --output_dir "$out/plain" > "$out/plain.log" 2>&1 &
      engine masking-on --warmup_steps 80 &
      engine masking-off --warmup_steps 80 --document_masking false --attn_implementation sdpa &
      models+=("$out/plain" "$out/masking-on/final" "$out/masking-off/final");;
    seeds)  # the same two engine runs with another seed (initial weights and the order of the data)
      engine masking-on-seed2 --warmup_steps 80 --seed 2 &
      engine masking-off-seed2 --warmup_steps 80 --seed 2 --document_masking false --attn_implementation sdpa &
      models+=("$out/masking-on-seed2/final" "$out/masking-off-seed2/final");;
    seed:*)  # parity's three runs with another seed
      n=${what#seed:}
      python scripts/plain_loop.py data/english data/gpt2-tokenizer --steps 400 --warmup_steps 80 --seed "$n" \
        --output_dir "$out/plain-seed$n" > "$out/plain-seed$n.log" 2>&1 &
      engine "masking-on-seed$n" --warmup_steps 80 --seed "$n" &
      engine "masking-off-seed$n" --warmup_steps 80 --seed "$n" --document_masking false --attn_implementation sdpa &
      models+=("$out/plain-seed$n" "$out/masking-on-seed$n/final" "$out/masking-off-seed$n/final");;
    engine:*)  # parity's two engine runs with another seed
      n=${what#engine:}
      engine "masking-on-seed$n" --warmup_steps 80 --seed "$n" &
      engine "masking-off-seed$n" --warmup_steps 80 --seed "$n" --document_masking false --attn_implementation sdpa &
      models+=("$out/masking-on-seed$n/final" "$out/masking-off-seed$n/final");;
    plainmask:*)  # the plain loop with document masking (its own mask, dense, through sdpa)
      n=${what#plainmask:}
      python scripts/plain_loop.py data/english data/gpt2-tokenizer --steps 400 --warmup_steps 80 --seed "$n" \
        --document_masking --output_dir "$out/plain-masking-seed$n" > "$out/plain-masking-seed$n.log" 2>&1 &
      models+=("$out/plain-masking-seed$n");;
    masked:*)  # the engine with document masking alone (varlen), the pair of plainmask:N
      n=${what#masked:}
      engine "masking-on-seed$n" --warmup_steps 80 --seed "$n" &
      models+=("$out/masking-on-seed$n/final");;
    sdpamask:*)  # the engine's document masking as a dense mask through sdpa, as the plain loop's own mask goes
      n=${what#sdpamask:}
      engine "masking-sdpa-seed$n" --warmup_steps 80 --seed "$n" --attn_implementation sdpa &
      models+=("$out/masking-sdpa-seed$n/final");;
    flex:*)  # the engine's document masking through flex attention instead of varlen: the mask or the kernel?
      n=${what#flex:}
      engine "masking-flex-seed$n" --warmup_steps 80 --seed "$n" --attn_implementation flex_attention &
      models+=("$out/masking-flex-seed$n/final");;
    muon:*|muonone:*)  # Muon for the hidden matrices (Q, K and V apart; muonone: as one matrix), no document masking
      n=${what#*:}; name=muon-seed$n; flags=()
      [[ $what == muonone:* ]] && { name=muon-one-qkv-seed$n; flags=(--muon_split_qkv false); }
      engine "$name" --warmup_steps 80 --seed "$n" --optimizer muon --document_masking false \
        --attn_implementation sdpa "${flags[@]}" &
      models+=("$out/$name/final");;
    plain:*)  # the plain loop alone with another seed
      n=${what#plain:}
      python scripts/plain_loop.py data/english data/gpt2-tokenizer --steps 400 --warmup_steps 80 --seed "$n" \
        --output_dir "$out/plain-seed$n" > "$out/plain-seed$n.log" 2>&1 &
      models+=("$out/plain-seed$n");;
    warmup)
      for w in 20 40 160; do engine "warmup-$w" --warmup_steps $w & done
      models+=("$out/warmup-20/final" "$out/warmup-40/final" "$out/warmup-160/final");;
    *) echo "usage: $0 OUT parity|seeds|seed:N|engine:N|plain:N|plainmask:N|masked:N|sdpamask:N|flex:N|muon:N|muonone:N|warmup ..." >&2; exit 2;;
  esac
done
wait  # a group of more than four runs can run out of an H200's memory (six did, 2026-12-03): a run that failed is named

kept=(); for m in "${models[@]}"; do if [ -d "$m" ]; then kept+=("$m"); else echo "no model: $m (its log says why)"; fi; done
models=("${kept[@]}")
for f in "$out"/*/summary.json; do  # engine runs only: a group of plain loops alone has none
  [ -e "$f" ] || continue
  python -c "import json,sys; s=json.load(open(sys.argv[1])); print(sys.argv[1], 'engine val_loss', round(s['eval']['val_loss'], 4), 'wall', round(s['wall_time_s']))" "$f"
done
grep -h '"run": "plain_loop"' "$out"/plain*.log 2>/dev/null || true
python scripts/compare.py "${models[@]}" --tasks text,wikitext --dataset data/english/validation.parquet \
  --max_documents 1000 --wikitext data/eval/wiki.test.raw --output_dir "$out/compare" | tail -12
python scripts/compare.py "${models[@]}" --tasks text --dataset data/eval/tinyshakespeare.txt \
  --output_dir "$out/compare-shakespeare" | tail -10

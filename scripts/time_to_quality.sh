#!/usr/bin/env bash
# Time to a target validation loss on one GPU, one recipe after another (each alone: its training seconds are its
# own): the article's recipe (configs/seed-3090.yaml on the English corpus), the best AdamW recipe
# (configs/english-124m-adamw.yaml) and the best Muon recipe (configs/english-124m.yaml, 2^15 tokens a step), each
# stopped at the first evaluation at or under TARGET (stop_at_val_loss). The article's recipe reaches 4.33 only after
# 42.7M tokens (over three minutes at its speed), so by default it runs SEED_TOKENS and its time is its tokens to
# target (from a run to the target, SEED_CURVE) over the tokens/s measured here; its curve is drawn from that run at
# this speed. Then the chart: validation loss against seconds of training.
#
#   bash scripts/time_to_quality.sh runs/ttq
#   TARGET=4.0 MUON_FLAGS='--max_tokens 52428800' bash scripts/time_to_quality.sh runs/ttq-4.0
#   RECIPES=muon MUON_FLAGS='--read_ahead 96' bash scripts/time_to_quality.sh runs/ttq-muon   # some of them only
# On several GPUs: the same recipe, launched on each (its 32,768 tokens a step split among them: 4 rows a GPU on eight)
#   LAUNCH='accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes 8' RECIPES=muon \
#     MUON_FLAGS='--micro_batch_size 4' bash scripts/time_to_quality.sh runs/ttq-8
set -uo pipefail
out=${1:-runs/ttq}
target=${TARGET:-4.33}
mkdir -p "$out"
recipe() {  # NAME FLAGS...
  local name=$1; shift
  ${LAUNCH:-python} scripts/pretrain.py --output_dir "$out/$name" --stop_at_val_loss "$target" --save_every 0 --sample_prompts \
    "$@" > "$out/$name.log" 2>&1 || { echo "$name failed: $out/$name.log"; grep -E "Error|error" "$out/$name.log" | tail -3; }
}
recipes=${RECIPES:-seed muon adamw}
wanted() { [[ " $recipes " == *" $1 "* ]]; }
wanted seed && recipe seed --config configs/seed-3090.yaml --dataset data/english \
  --tokenizer data/gpt2-tokenizer --compile true --max_tokens "${SEED_TOKENS:-13107200}" --eval_every 534 \
  --eval_batches 0 ${SEED_FLAGS:-}
# Muon in steps of 2^15 tokens on a 512-step schedule ending near where it crosses 4.33 (time-to-quality.md).
wanted muon && recipe muon --config configs/english-124m.yaml --tokens_per_step 32768 --max_tokens 16777216 \
  --eval_every 25 ${MUON_FLAGS:-}
wanted adamw && recipe adamw --config configs/english-124m-adamw.yaml --eval_every 25 ${ADAMW_FLAGS:-}
for name in $recipes; do
  python - "$out/$name/summary.json" <<'PY' || true
import json, sys
s = json.load(open(sys.argv[1]))
t = s.get("time_to_target") or {}
print(sys.argv[1], f"tokens {s['tokens']:,}", f"train_s {s['train_time_s']:.1f}", f"tokens/s {s['tokens'] / s['train_time_s']:,.0f}",
      f"val_loss {s['eval'].get('val_loss', float('nan')):.4f}" if s.get("eval") else "", "target:", json.dumps(t))
PY
done
[[ $recipes == "seed muon adamw" ]] || exit 0  # the chart is of all three
# The article's recipe drawn from its run to the target (SEED_CURVE) at the speed this call measured for it.
seed_rate=$(python -c "import json, sys; s = json.load(open(sys.argv[1])); print(round(s['tokens'] / s['train_time_s']))" \
  "$out/seed/summary.json") || exit 1
curve=${SEED_CURVE:-docs/results/time-to-quality/seed-to-target}
python -c "import json, sys; t = json.load(open(sys.argv[1]))['time_to_target']; rate = int(sys.argv[2])
print(f\"the article's recipe: {t['tokens']:,} tokens to target ({sys.argv[1]}) / {rate:,} tokens/s = {t['tokens'] / rate:.1f} s\")" \
  "$curve/summary.json" "$seed_rate"
python scripts/plot_curves.py "$curve" "$out/adamw" "$out/muon" \
  --tokens_per_s "$seed_rate" 0 0 \
  --labels "the article's recipe (seed-3090.yaml)" "AdamW (english-124m-adamw.yaml)" "Muon (english-124m.yaml)" \
  --x seconds --target "$target" --title "GPT-2 124M, English corpus, one GPU: validation loss against training time" \
  --out "$out/time-to-quality.png"

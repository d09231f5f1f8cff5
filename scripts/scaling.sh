#!/usr/bin/env bash
# Scaling on one machine of several GPUs, one part a call (each fits in ten minutes):
#   bash scripts/scaling.sh runs/scaling ddp             # GPT-2 124M at gpt2-small.yaml's 2^19 tokens a step on 1, 4 and
#                                                        # 8 GPUs (those the machine has) with DDP; the hand-written
#                                                        # reference measured on one GPU in the same call
#   bash scripts/scaling.sh runs/scaling medium large    # each size on every GPU, DDP then FSDP2: tokens/s, MFU, memory
#   bash scripts/scaling.sh runs/scaling xl
# Rows go to OUT/rows.jsonl (benchmark.py's JSON line, with the run's name); a table is printed at the end of each
# part. A run that fails (out of memory, say) prints its last error lines and the part goes on without it.
# Time to quality on several GPUs is scripts/time_to_quality.sh with LAUNCH set (its header).
set -u
out=${1:?usage: bash scripts/scaling.sh OUT ddp|medium|large|xl ...}; shift
mkdir -p "$out"
gpus=$(nvidia-smi -L | wc -l)
steps=${STEPS:---benchmark_steps 10 --benchmark_warmup_steps 3}
bench() {  # NAME PROCESSES ACCELERATE_CONFIG BENCHMARK_FLAGS...
  local name=$1 n=$2 config=$3; shift 3
  echo "== $name: $n GPU(s)"
  timeout "${LIMIT:-400}" accelerate launch --config_file "$config" --num_processes "$n" scripts/benchmark.py $steps \
    --output_dir "/tmp/bench-$name" "$@" > "$out/$name.log" 2>&1
  if grep -q '^{' "$out/$name.log"; then
    grep '^{' "$out/$name.log" | sed "s/^{/{\"run\": \"$name\", /" >> "$out/rows.jsonl"
  else
    grep -E "Error|error|refused|out of memory" "$out/$name.log" | tail -3
  fi
}
for part in "$@"; do
  case $part in
    ddp)  # one GPU first: it measures the reference in its own process, and the others are held to that figure
      bench small-1 1 accelerate_config.yaml --config configs/gpt2-small.yaml
      ref=$(grep '"run": "small-1"' "$out/rows.jsonl" | tail -1 | python3 -c \
        "import json, sys; print(json.load(sys.stdin)['reference_tokens_per_s'])") || { echo "no one-GPU row"; exit 1; }
      for n in 4 8; do
        [ "$n" -le "$gpus" ] && bench "small-$n" "$n" configs/accelerate/ddp.yaml --config configs/gpt2-small.yaml \
          --reference_tokens_per_s "$ref"
      done ;;
    medium|large|xl)
      bench "$part-ddp" "$gpus" configs/accelerate/ddp.yaml --config "configs/gpt2-$part.yaml"
      bench "$part-fsdp" "$gpus" configs/accelerate/fsdp.yaml --config "configs/gpt2-$part.yaml" ;;
    *) echo "unknown part $part: ddp, medium, large or xl"; exit 2 ;;
  esac
done
python3 - "$out/rows.jsonl" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
one = next((r["tokens_per_s"] for r in rows if r["run"] == "small-1"), None)
print(f"{'run':12} {'GPUs':>4} {'accum':>5} {'tokens/s':>11} {'x one GPU':>9} {'x ref a GPU':>11} {'MFU':>5} {'GiB a GPU':>9}")
for r in rows:
    speedup = f"{r['tokens_per_s'] / one:.2f}" if one and r["run"].startswith("small-") else ""
    ratio = f"{r['vs_reference']:.3f}" if r.get("vs_reference") else ""
    print(f"{r['run']:12} {r['processes']:>4} {r['gradient_accumulation_steps']:>5} {r['tokens_per_s']:>11,} {speedup:>9} "
          f"{ratio:>11} {r['mfu_vs_989_tflops']:>5.1%} {r['peak_memory_gib'] or 0:>9.1f}")
EOF

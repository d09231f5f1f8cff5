#!/usr/bin/env bash
# The throughput table of docs/results/throughput.md, on one GPU: the hand-written reference first, then each variant in its
# own process with the reference's figure, so every row carries `vs_reference` from the same machine.
# usage: bash scripts/gpu_bench.sh OUT_FILE [variant ...]     (no variant: all of them)
# varlen runs FA4 where flash-attn-4 is installed and the GPU is a Hopper or Blackwell (varlen_kernel auto),
# varlen_torch PyTorch's FlashAttention-2 kernel.
set -u
out=$1; shift
B="python3 scripts/benchmark.py --config configs/gpt2-small.yaml --gradient_accumulation_steps 1 --benchmark_steps 20 --output_dir /tmp/bench"
declare -A V=(
  [eager_sdpa]="--attn_implementation sdpa --compile False"
  [sdpa_nomask]="--attn_implementation sdpa --document_masking False"
  [sdpa]="--attn_implementation sdpa"
  [flex]="--attn_implementation flex_attention"
  [varlen]="--attn_implementation varlen"
  [varlen_torch]="--attn_implementation varlen --varlen_kernel torch"
  [varlen_mb16]="--attn_implementation varlen --micro_batch_size 16"
  [varlen_mb64]="--attn_implementation varlen --micro_batch_size 64"
  [varlen_fused]="--attn_implementation varlen --fused_cross_entropy"
)
ORDER="sdpa_nomask sdpa flex varlen varlen_torch varlen_mb16 varlen_mb64 varlen_fused eager_sdpa"
[ $# -eq 0 ] && set -- $ORDER
echo "== reference"
ref=$($B --benchmark reference 2>/tmp/bench_reference.log | grep '^{' | tee -a "$out" | python3 -c "import json,sys; print(json.load(sys.stdin)['tokens_per_s'])") \
  || { tail -3 /tmp/bench_reference.log; exit 1; }
echo "reference: $ref tokens/s"
for name in "$@"; do
  echo "== $name"
  timeout 240 $B ${V[$name]} --reference_tokens_per_s "$ref" > /tmp/bench_$name.log 2>&1
  if grep -q '^{' /tmp/bench_$name.log; then
    grep '^{' /tmp/bench_$name.log | sed "s/^{/{\"variant\": \"$name\", /" >> "$out"
  else  # the variant failed: its last error lines, and the table goes on without it
    grep -E "Error|error" /tmp/bench_$name.log | tail -3
  fi
done
python3 - "$out" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
for r in rows:
    print(f"{r.get('variant', r['benchmark']):16} {r['tokens_per_s']:>9,} tok/s  x{r.get('vs_reference') or 1:.3f} of the reference"
          f"  mb {r['micro_batch_size']}  peak {r.get('peak_memory_gib') or 0:.1f} GiB  {r.get('varlen_kernel') or ''}")
EOF

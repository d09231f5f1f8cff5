#!/usr/bin/env bash
# The throughput measurements of the README, as run on the device GPU: one JSON line per variant.
# usage: bash scripts/gpu_bench.sh OUT_FILE [variant ...]
set -u
out=$1; shift
B="python3 scripts/benchmark.py --config configs/gpt2-small.yaml --gradient_accumulation_steps 1 --benchmark_steps 15 --output_dir /tmp/bench"
declare -A V=(
  [eager_sdpa]="--attn_implementation sdpa --compile False"
  [sdpa]="--attn_implementation sdpa"
  [sdpa_nomask]="--attn_implementation sdpa --document_masking False"
  [flex]="--attn_implementation flex_attention"
  [flex_autotune]="--attn_implementation flex_attention --compile_mode max-autotune-no-cudagraphs"
  [flex_cudagraphs]="--attn_implementation flex_attention --compile_mode reduce-overhead"
  [flex_fused]="--attn_implementation flex_attention --fused_cross_entropy"
  [flex_fused_mb64]="--attn_implementation flex_attention --fused_cross_entropy --micro_batch_size 64"
  [sdpa_fused_mb64]="--attn_implementation sdpa --fused_cross_entropy --micro_batch_size 64"
)
for name in "$@"; do
  echo "== $name"
  timeout 150 $B ${V[$name]} 2>&1 | tee /tmp/bench_$name.log | grep '^{' | sed "s/^{/{\"variant\": \"$name\", /" | tee -a "$out"
  grep -E "Error|error" /tmp/bench_$name.log | tail -3
done

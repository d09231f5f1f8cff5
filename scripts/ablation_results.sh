#!/usr/bin/env bash
# The ablation of docs/results/ablations/: the seed article's recipe (configs/seed-3090.yaml) on the English
# corpus, three seeds of it, each intervention of configs/ablations/article.yaml alone, then the stack of those
# that helped beyond the seeds' noise; one run per GPU, four at a time on a machine with four.
#
#   data/english and data/gpt2-tokenizer laid out as docs/results/english/README.md (The data) says, then
#   timeout -s TERM 570 bash scripts/ablation_results.sh     # again until it prints "done"
#
# 25,165,824 tokens per run (24 x 2^20, a multiple of 6, 96 and 512 sequences of 1,024, so every run trains
# exactly as many tokens): 16 runs and the stack took 19.5 minutes of four H100s on 2026-11-27, start-up
# included (a run 187-320 s: 173k-206k tokens/s, fp32 116k, plus start-up, compilation, evaluation, saving).
#
# Stopped (SIGTERM, SIGINT, a time limit), the runs in progress stop too (with a checkpoint while training); the
# same command continues them and skips the finished ones. Flags after the two folders go to every run: a check
# of every command on a CPU (a tiny model; validation on 16 sequences, the whole split takes minutes on a CPU) is
#   BUDGET=32768 bash scripts/ablation_results.sh /tmp/abl-check /tmp/abl-docs --n_layer 2 --n_head 2 --n_embd 32 \
#       --block_size 64 --compile false --micro_batch_size 8 --eval_batches 2 --parallel 2
set -u
R=${1:-runs/ablate-english}
DOCS=${2:-docs/results/ablations}
shift $(( $# < 2 ? $# : 2 ))
BUDGET=${BUDGET:-25165824}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
step() { echo "== $(date -u +%H:%M:%S) $*"; }

step ablate
# --max_grad_norm 0: the article's baseline did not clip (seed-3090.yaml leaves the engine's 1.0). --eval_batches 0:
# every run scored on the whole validation split. --log_every 10: the 48 steps of 512 sequences still give
# windows after the first, which holds compilation and is left out of tokens/s.
# In the background with the signals passed on, so that a time limit's SIGTERM reaches ablate.py (which stops
# the runs with a checkpoint) rather than only this shell.
python3 scripts/ablate.py --base configs/seed-3090.yaml --interventions configs/ablations/article.yaml \
    --max_tokens "$BUDGET" --seeds 3 --output_dir "$R" \
    --dataset data/english --tokenizer data/gpt2-tokenizer --max_grad_norm 0 --compile true \
    --eval_every 0 --eval_batches 0 --save_every 0 --log_every 10 "$@" &
pid=$!
trap 'kill -TERM $pid; wait $pid; exit 143' TERM INT
wait $pid
status=$?
trap - TERM INT
# 0: every run finished; 1: the report is written and names the runs that failed; else it stopped early.
if [ $status -gt 1 ] || [ ! -f "$R/report.md" ]; then
  step "ablate.py stopped (status $status); if a signal or time limit stopped it, the same command continues"
  exit $status
fi

step "copy the report and each run's config.yaml, metrics.jsonl, summary.json to $DOCS"
mkdir -p "$DOCS/english/run_files"
cp "$R/report.md" "$R/results.json" "$R/deltas.png" "$DOCS/english/"
for run in "$R"/runs/*/; do
  name=$(basename "$run")
  mkdir -p "$DOCS/english/run_files/$name"
  cp "$run"config.yaml "$run"metrics.jsonl "$run"summary.json "$DOCS/english/run_files/$name/" 2>/dev/null
done
step done

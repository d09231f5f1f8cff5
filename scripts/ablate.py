"""Which changes to a recipe matter: the baseline with several seeds (its noise), each intervention alone, then
the stack of those that helped beyond the noise; one run per GPU at a time, all on the same data, tokens
and evaluation. Writes report.md (table and chart), results.json and deltas.png in --output_dir.

    python scripts/ablate.py --base configs/seed-3090.yaml --interventions configs/ablations/article.yaml \\
        --max_tokens 25165824 --output_dir runs/ablate --dataset data/english --tokenizer data/gpt2-tokenizer \\
        --max_grad_norm 0 --eval_batches 0
    python scripts/ablate.py --base configs/default.yaml --add 'no_warmup=--warmup_steps 0' \\
        --add 'wide=--n_embd 256' --max_tokens 400000 --output_dir runs/ablate-tiny

An intervention is the flags you would give scripts/pretrain.py (`no_dropout: --dropout 0.0` in the
--interventions YAML file, or --add 'no_dropout=--dropout 0.0'). Any other flag (--dataset ...) is a field
applied to every run. Every run's flags are checked before the first run starts. The same command again
skips the finished runs and continues the stopped ones. Δ = a run's validation loss − the baseline's:
negative is better.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, no install needed

from hf_gpt.ablation import Ablation, device_slots, execute, inline_intervention, judge, read_interventions, \
    write_outputs  # noqa: E402
from hf_gpt.config import ScriptParser, UserError, run_cli  # noqa: E402


def main():
    # ScriptParser takes no abbreviations: --seed (a field, refused) must not be read as --seeds.
    parser = ScriptParser(description=__doc__)
    parser.add_argument("--base", required=True, help="The baseline's YAML recipe (a scripts/pretrain.py --config).")
    parser.add_argument("--interventions", help="YAML file of name: overrides, e.g. `no_dropout: --dropout 0.0`.")
    parser.add_argument("--add", action="append", default=[], metavar="NAME=FLAGS",
                        help="One more intervention, e.g. --add 'no_dropout=--dropout 0.0' (repeatable).")
    parser.add_argument("--max_tokens", type=int, required=True, help="Training tokens of every run.")
    parser.add_argument("--seeds", type=int, default=3, help="Runs of the baseline (seed, seed + 1, ...): the noise.")
    parser.add_argument("--output_dir", required=True, help="The ablation's folder: runs/, logs/, report.md.")
    parser.add_argument("--parallel", type=int, default=0,
                        help="Runs at a time; 0: one per visible GPU, or 1 on a CPU (each run gets its own cores).")
    args, common = parser.parse_known_args()

    interventions = read_interventions(args.interventions) if args.interventions else {}
    for text in args.add:
        name, overrides = inline_intervention(text)
        if name in interventions:
            raise UserError(f"--add {name}: an intervention of that name is in {args.interventions} already")
        interventions[name] = overrides
    ablation = Ablation(args.base, interventions, common, args.max_tokens, args.seeds, args.output_dir)
    slots = device_slots(None if args.parallel == 0 else args.parallel)

    from tqdm.auto import tqdm

    from hf_gpt.start import lock_output_dir

    lock_output_dir(ablation.output_dir)  # two ablations in one folder would run the same runs twice
    runs = list(ablation.runs)
    with tqdm(total=len(runs), desc="ablation", unit="run", dynamic_ncols=True) as bar:
        execute(ablation, runs, slots, bar)
        judge(runs)
        stack, members, left_out = ablation.stack()
        if stack:
            bar.total += 1
            runs.append(stack)
            try:  # known only now: checked as the others were, and a problem is this run's failure
                ablation.check(stack)
            except UserError as e:
                stack.status, stack.error = "failed", str(e)
                bar.update()
            else:
                execute(ablation, [stack], slots, bar)
    noise = judge(runs)
    paths = write_outputs(ablation, runs, noise, {"members": members, "left_out": left_out, "run": bool(stack)},
                          len(slots))
    failed = [r.name for r in runs if r.status != "finished"]
    print(f"wrote {', '.join(map(str, paths))}; runs in {ablation.output_dir / 'runs'}"
          + (f"; failed: {', '.join(failed)} (their logs: {ablation.output_dir / 'logs'})" if failed else ""))
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    run_cli(main)

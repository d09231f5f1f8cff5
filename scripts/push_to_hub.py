"""Publish a run's model or LoRA adapter on the Hugging Face Hub, with a model card (README.md).

    hf auth login                                                        # or export HF_TOKEN=...
    python scripts/push_to_hub.py runs/gpt2-small/final --repo me/my-gpt2
    python scripts/push_to_hub.py runs/me/adapter --repo me/my-style     # private: trained on personal writing
    python scripts/push_to_hub.py runs/sft/final --repo me/my-sft --results reports/cmp/results.json
    python scripts/push_to_hub.py runs/gpt2-small/final --repo me/my-gpt2 --dry_run   # card only, no upload

The folder is loaded first (transformers, or PEFT for an adapter); README.md is written into it from the
run's summary.json and config.yaml next to it. A LoRA folder (its provenance.json says so, wherever it is)
and a folder with no record of how it was made go to a private repo unless --public. docs/hub.md has the details.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, no install needed

from hf_gpt.config import ScriptParser, run_cli  # noqa: E402
from hf_gpt.hub import check_names, prepare_folder, push_folder, read_folder, results_row  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = ScriptParser(description=__doc__)
    p.add_argument("folder", help="A run's final/ (Hub-format model) or adapter/ (PEFT LoRA adapter).")
    p.add_argument("--repo", required=True, help="Hub repo id: owner/name, or name for your own account.")
    visibility = p.add_mutually_exclusive_group()
    visibility.add_argument("--private", action="store_true", help="Make a new repo private.")
    visibility.add_argument("--public", action="store_true",
                            help="Make a new repo public, even for a LoRA run (private by default: personal data) "
                                 "or a folder that does not say where it comes from (private by default).")
    p.add_argument("--revision", help="Branch to push to; made from main when it does not exist.")
    p.add_argument("--create_pr", action="store_true", help="Open a pull request against main instead of pushing.")
    p.add_argument("--results", help="results.json of scripts/compare.py: its row for this folder goes into the "
                                     "card's model-index.")
    p.add_argument("--base_model", help="Hub id of the base model, when the run started from a local folder.")
    p.add_argument("--license", default="mit", help="License id for the card (default: mit, as GPT-2).")
    p.add_argument("--language", nargs="+", help="Language codes for the card (default: en; code for stdlib runs).")
    p.add_argument("--commit_message", help="Commit message (default: Upload model (recipe) with hf-gpt).")
    p.add_argument("--dry_run", action="store_true",
                   help="Check the folder and write README.md, upload nothing (no token needed).")
    return p.parse_args(argv)


def main() -> None:
    args = parse_args()
    private = True if args.private else False if args.public else None
    card = {"license": args.license, "language": args.language, "base_model": args.base_model}
    if args.dry_run:  # push_folder's local steps only
        check_names(args.repo, args.base_model)
        info = read_folder(args.folder)
        row = results_row(args.results, info.path) if args.results else None
        files = prepare_folder(info, args.repo, results=row, revision=args.revision, private=private, **card)
        print(f"checked {info.path}: loads with {info.loaded_with}; wrote {info.path / 'README.md'}")
        print("would upload:\n" + "\n".join(f"  {f.relative_to(info.path).as_posix()}" for f in files))
        return
    url = push_folder(args.folder, args.repo, private=private, revision=args.revision, create_pr=args.create_pr,
                      results=args.results, commit_message=args.commit_message, **card)
    print(f"published: {url}")


if __name__ == "__main__":
    run_cli(main)

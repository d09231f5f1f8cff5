"""Run a command against a stand-in of the Hub on loopback that serves a local corpus as FineWeb-Edu.

The Hub is out of reach on the machines this project is measured on, so configs/gpt2-small.yaml's own code path
(FineWeb-Edu's sample-10BT streamed by ranged Parquet reads, the tokenizer from openai-community/gpt2, HellaSwag
from Rowan/hellaswag) is exercised against tests/hub_server.py instead: it publishes

    HuggingFaceFW/fineweb-edu   config sample-10BT: the corpus's validation documents first (the head of the
                                stream that val_documents holds out), then each train file, in FineWeb-Edu's columns
                                (and a file of other documents as its default config, never read)
    openai-community/gpt2       the tokenizer's files (GPT-2's vocab.json + merges.txt, as the Hub's repo holds them)
                                and a config.json
    Rowan/hellaswag             its validation split as one Parquet file, from a local JSON Lines copy

and runs the command with HF_ENDPOINT pointing at it (a fresh HF_HOME, nothing offline), then prints what the
stand-in served. Its exit status is the command's.

    python scripts/standin_run.py --corpus data/english --tokenizer data/gpt2-tokenizer \\
        --hellaswag data/eval/hellaswag_val.jsonl.xz -- \\
        accelerate launch scripts/pretrain.py --config configs/gpt2-small.yaml --val_documents 104 ...
"""

import argparse
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # a checkout, no install; the stand-in lives with its tests

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from hub_server import FINEWEB_EDU_README, HubStandIn, fineweb_edu_parquet, hub_env  # noqa: E402

from hf_gpt.benchmarks import load_benchmark  # noqa: E402
from hf_gpt.config import UserError  # noqa: E402


def texts(path: Path) -> list[str]:
    return pq.read_table(path, columns=["text"]).column("text").to_pylist()


def fineweb_edu(corpus: Path) -> tuple[dict[str, bytes], int]:
    """The repo's files, and how many documents come first from the corpus's validation.parquet (0 without one)."""
    head = texts(corpus / "validation.parquet") if (corpus / "validation.parquet").is_file() else []
    parts = [head] if head else []
    parts += [texts(p) for p in sorted(corpus.glob("train*.parquet"))]
    if not parts:
        sys.exit(f"error: no train*.parquet files in {corpus}")
    # The default config (every dump) must hold files too: `datasets` resolves every config's files on loading one.
    files = {"README.md": FINEWEB_EDU_README,
             "data/CC-MAIN-2024-10/000_00000.parquet": fineweb_edu_parquet(["not the sample"] * 4, 0)}
    first = 0
    for i, part in enumerate(parts):
        # Row groups of 256 documents: a streaming reader fetches each by its own ranged read, as from the Hub.
        files[f"sample/10BT/{i:03d}_00000.parquet"] = fineweb_edu_parquet(part, first, row_group_size=256)
        first += len(part)
    return files, len(head)


def hellaswag(path: Path) -> dict[str, bytes]:
    records, _ = load_benchmark("hellaswag", str(path))  # read and checked as compare.py reads a local copy
    buffer = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(records), buffer)
    return {"data/validation-00000-of-00001.parquet": buffer.getvalue().to_pybytes()}


def gpt2(tokenizer: Path) -> dict[str, bytes]:
    from transformers import GPT2Config

    files = {p.name: p.read_bytes() for p in sorted(tokenizer.iterdir()) if p.is_file()}
    if not {"vocab.json", "tokenizer.json"} & set(files):
        sys.exit(f"error: {tokenizer} holds no tokenizer (vocab.json + merges.txt, or tokenizer.json)")
    # The Hub's repo has config.json, which AutoTokenizer reads to pick GPT-2's class for a bare vocab + merges.
    files.setdefault("config.json", GPT2Config().to_json_string().encode())
    return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", type=Path, required=True, help="a folder of train*.parquet (+ validation.parquet)")
    parser.add_argument("--tokenizer", type=Path, required=True, help="a tokenizer folder (GPT-2's vocab.json + merges.txt)")
    parser.add_argument("--hellaswag", type=Path, help="HellaSwag's validation split as JSON Lines (.jsonl[.xz])")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")

    dataset, head = fineweb_edu(args.corpus)
    try:
        hellaswag_files = hellaswag(args.hellaswag) if args.hellaswag else None
    except UserError as e:
        sys.exit(f"error: {e}")
    with HubStandIn({}, max_requests=10**9, lifetime_s=7 * 24 * 3600) as hub, tempfile.TemporaryDirectory() as home:
        hub.add_repo("HuggingFaceFW/fineweb-edu", dataset, kind="dataset")
        hub.add_repo("openai-community/gpt2", gpt2(args.tokenizer))
        if hellaswag_files:
            hub.add_repo("Rowan/hellaswag", hellaswag_files, kind="dataset")
        print(f"stand-in of the Hub at {hub.url}: HuggingFaceFW/fineweb-edu (sample-10BT, "
              f"{sum(len(c) for c in dataset.values()) / 2**20:.0f} MiB; its first {head} documents are "
              f"{args.corpus}/validation.parquet), openai-community/gpt2"
              + (", Rowan/hellaswag" if args.hellaswag else ""), flush=True)
        env = hub_env(hub.url, home)
        start = time.perf_counter()
        child = subprocess.Popen(command, env=env)
        # A stop asked of this script (Ctrl-C, `timeout`) goes to the run, which saves its checkpoint and ends.
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda signum, _: child.send_signal(signum))
        rc = child.wait()
        print(f"stand-in: {len(hub.requests):,} requests ({len(hub.ranges):,} ranged reads) in "
              f"{time.perf_counter() - start:.0f} s; endpoints it lacks: {hub.unhandled or 'none'}", flush=True)
    return rc if rc >= 0 else 128 - rc  # a run a signal ended: as a shell reports it


if __name__ == "__main__":
    sys.exit(main())

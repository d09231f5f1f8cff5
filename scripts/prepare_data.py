"""Tokenize a corpus once into memory-mapped token shards, for data loading that never limits a GPU.

    python scripts/prepare_data.py --dataset HuggingFaceFW/fineweb-edu --dataset_config sample-10BT \\
        --tokenizer openai-community/gpt2 --output_dir data/fineweb-edu-gpt2
    accelerate launch scripts/pretrain.py --config configs/gpt2-small.yaml --dataset data/fineweb-edu-gpt2
"""

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, no install needed

from tqdm.auto import tqdm  # noqa: E402

from hf_gpt.config import load_config, run_cli  # noqa: E402
from hf_gpt.data import DocumentSource, write_token_shards  # noqa: E402
from hf_gpt.loading import load_tokenizer  # noqa: E402


@dataclass
class PrepareConfig:
    output_dir: str = field(metadata={"help": "Folder to create (must not exist)."})
    dataset: str = field(default="stdlib", metadata={"help": "Hub id, local file/folder or 'stdlib'."})
    dataset_config: str = ""
    dataset_split: str = "train"
    text_column: str = "text"
    tokenizer: str = "openai-community/gpt2"
    val_fraction: float = field(default=0.0005, metadata={
        "help": "Share of documents held out (by hash) for validation: the training config's val_fraction."})
    shard_tokens: int = 100_000_000
    max_documents: int = field(default=0, metadata={"help": "Stop after this many documents per split (0: all)."})
    data_encoding_errors: str = "strict"

    renamed: ClassVar[dict[str, str]] = {"out": "output_dir", "holdout_fraction": "val_fraction"}


def main():
    cfg = load_config(PrepareConfig, description=__doc__)
    tokenizer = load_tokenizer(cfg.tokenizer)
    source = DocumentSource(cfg.dataset, config=cfg.dataset_config, split=cfg.dataset_split,
                            text_column=cfg.text_column, encoding_errors=cfg.data_encoding_errors)
    bar = tqdm(unit="tok", unit_scale=True, desc="tokenizing")

    def progress(split, n):
        bar.set_postfix(split=split, refresh=False)
        bar.update(n)

    meta = write_token_shards(source, tokenizer, Path(cfg.output_dir), holdout=cfg.val_fraction,
                              shard_tokens=cfg.shard_tokens, max_documents=cfg.max_documents, progress=progress)
    bar.close()
    for split in ("train", "validation"):
        n = sum(s["tokens"] for s in meta["shards"] if s["split"] == split)
        print(f"{split}: {n:,} tokens in {sum(s['split'] == split for s in meta['shards'])} shard(s)")
    print(f"wrote {cfg.output_dir}/ (meta.json, *.bin, tokenizer/)")


if __name__ == "__main__":
    run_cli(main)

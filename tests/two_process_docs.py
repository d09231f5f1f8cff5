"""Launched by test_engine as two processes (torchrun + ACCELERATE_USE_CPU): every process writes the
documents its training stream yields in one pass, as the training loop would read them."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from accelerate import Accelerator  # noqa: E402

from hf_gpt.config import PretrainConfig  # noqa: E402
from hf_gpt.data import PretrainData  # noqa: E402
from hf_gpt.loading import load_tokenizer  # noqa: E402

corpus, tokenizer_dir, out = sys.argv[1:]
state = Accelerator()  # as in the engine: process index and count from the launcher
cfg = PretrainConfig(dataset=corpus, tokenizer=tokenizer_dir, val_fraction=0.1)
tokenizer = load_tokenizer(tokenizer_dir)
data = PretrainData(cfg, tokenizer)
documents = data._documents(False, state.process_index, state.num_processes)
texts = [tokenizer.decode(row["input_ids"][1:]) for row in documents]
Path(out).mkdir(exist_ok=True)
(Path(out) / f"rank{state.process_index}.json").write_text(json.dumps(texts))

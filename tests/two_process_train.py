"""Launched by test_loop as two processes (torchrun + ACCELERATE_USE_CPU): pretrains the tiny model on a
stream in which process k of n takes rows k::n of every batch that one process would read, so that
n processes x b rows train on exactly the batches of 1 process x n*b rows. Every process also writes a
checksum of the weights the recipe built, a digest of the weights it trained, and the next numbers its RNG gives
after training."""

import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from hf_gpt.config import PretrainConfig, load_config  # noqa: E402
from hf_gpt.data import PretrainData  # noqa: E402
from hf_gpt.engine import train  # noqa: E402
from hf_gpt.loading import load_tokenizer  # noqa: E402
from hf_gpt.model import build_model  # noqa: E402
from hf_gpt.start import start_run  # noqa: E402


class RowsOfOneStream:
    def __init__(self, data):
        self.data = data

    def train_batches(self, rank, world):
        inner = self.data.train_batches(0, 1)

        class Batches:
            def __next__(self):
                return {k: v[rank::world] for k, v in next(inner).items()}

            state_dict, load_state_dict = inner.state_dict, inner.load_state_dict

        return Batches()

    def eval_batches(self, rank, world):
        return self.data.eval_batches(rank, world)


cfg = load_config(PretrainConfig)
accelerator = start_run(cfg)
data = PretrainData(cfg, load_tokenizer(cfg.tokenizer))
model = build_model(cfg, len(data.tokenizer), data.tokenizer.eos_token_id)
built = sum(p.double().sum().item() for p in model.parameters())
train(cfg, model, data.tokenizer, RowsOfOneStream(data), accelerator)
rank = accelerator.process_index
trained = hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes() for p in model.parameters())).hexdigest()
(Path(cfg.output_dir) / f"rank{rank}.json").write_text(
    json.dumps({"built": built, "trained": trained, "rand": torch.rand(4).tolist()}))

"""A plain training loop for GPT-2 124M: the yardstick for how much a recipe learns per token (GPU).

Plain transformers GPT2LMHeadModel (Conv1D layout, sdpa), torch.compile, bf16 autocast,
one micro-batch of 64 x 1024 tokens a step (2^16 tokens), warmup ((step + 1) / (warmup + 1) of the rate) then
cosine to 10%, clipping at 1.0, AdamW (β 0.9/0.95, decay 0.1 on the 2-D weight matrices but the embeddings, as
the engine decays). The training files (train-*.parquet, column `text`) are tokenized once, each document followed by
EOS, concatenated and cut into 1024-token blocks; each step takes 64 blocks at random from the whole corpus
(--order random: a permutation, then the next 64 of it) or 64 consecutive blocks in file order (--order seq).
With --document_masking each document attends only to itself, its positions counted from its start: every EOS
opens a document, as the engine packs them (EOS, then the text), and an explicit (64, 1, 1024, 1024) mask goes to
sdpa, which transformers passes through as it is: an implementation of its own, to check the engine's against.
The final model is saved in Hub format, so that scripts/compare.py scores it as it scores the engine's.

    python scripts/plain_loop.py data/english data/gpt2-tokenizer --steps 400 --warmup_steps 80 --output_dir runs/plain

Grown from an 80-line loop of 2026-12-02, which measured on one H200, data/english, 400 steps:
AdamW 1.5e-3 with random blocks and warmup 80 4.70, warmup 20 5.15; consecutive blocks, warmup 80 5.10.
With --document_masking (random blocks, warmup 80, seeds 0/2/3, scored by compare.py): 4.685 / 4.699 / 4.691.
"""

import argparse
import glob
import json
import math
import time

import numpy as np
import pyarrow.parquet as pq
import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("dataset", help="Folder with train-*.parquet (a `text` column).")
p.add_argument("tokenizer", help="GPT-2 tokenizer folder (vocab.json + merges.txt).")
p.add_argument("--steps", type=int, default=400)
p.add_argument("--learning_rate", type=float, default=1.5e-3)
p.add_argument("--warmup_steps", type=int, default=80)
p.add_argument("--order", choices=["random", "seq"], default="random")
p.add_argument("--document_masking", action="store_true", help="Attention and positions within each document.")
p.add_argument("--seed", type=int, default=0, help="Seeds the order of the blocks (seed) and the initial weights (1337 + seed).")
p.add_argument("--output_dir", required=True, help="Where the final model is saved (Hub format).")
args = p.parse_args()

torch.backends.cuda.matmul.allow_tf32 = True
tokenizer = GPT2TokenizerFast.from_pretrained(args.tokenizer)
texts = [t for f in sorted(glob.glob(f"{args.dataset}/train-*.parquet"))
         for t in pq.read_table(f, columns=["text"]).column("text").to_pylist()]
started = time.time()
train = torch.from_numpy(np.fromiter((t for ids in tokenizer(texts)["input_ids"] for t in ids + [tokenizer.eos_token_id]),
                                     dtype=np.int64))
print(f"tokenized {len(train):,} tokens in {time.time() - started:.0f} s", flush=True)

B, T = 64, 1024
blocks = (len(train) - 1) // T
order = torch.randperm(blocks, generator=torch.Generator().manual_seed(args.seed)) if args.order == "random" else torch.arange(blocks)

torch.manual_seed(1337 + args.seed)
model = GPT2LMHeadModel(GPT2Config(n_positions=T, n_embd=768, n_layer=12, n_head=12, vocab_size=50304,
                                   resid_pdrop=0, embd_pdrop=0, attn_pdrop=0, tie_word_embeddings=True,
                                   attn_implementation="sdpa")).cuda()
model.config.use_cache = False
decay = [p for n, p in model.named_parameters() if p.ndim == 2 and "wte" not in n and "wpe" not in n]
rest = [p for n, p in model.named_parameters() if not (p.ndim == 2 and "wte" not in n and "wpe" not in n)]
optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                              lr=args.learning_rate, betas=(0.9, 0.95), fused=True)


def lr_at(step: int) -> float:
    if step < args.warmup_steps:
        return args.learning_rate * (step + 1) / (args.warmup_steps + 1)
    progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    return args.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))



def document_inputs(x: torch.Tensor) -> dict:
    """Positions from each document's start and a (B, 1, T, T) mask: causal, within the document. A row's first
    token starts a document too (the rest of one cut by the block boundary), as the engine's rows do."""
    idx = torch.arange(x.shape[1], device=x.device)
    opens = x == tokenizer.eos_token_id
    start = torch.where(opens, idx, 0).cummax(dim=1).values  # index of the EOS that opened each token's document
    doc = opens.cumsum(dim=1)
    mask = (doc[:, :, None] == doc[:, None, :]) & (idx[:, None] >= idx[None, :])
    return {"position_ids": idx - start, "attention_mask": mask[:, None]}


forward = torch.compile(model)
started, curve = time.time(), []
for step in range(args.steps):
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step)
    idx = order[(step * B + torch.arange(B)) % blocks]
    x = torch.stack([train[j * T:(j + 1) * T] for j in idx.tolist()]).cuda(non_blocking=True)
    with torch.autocast("cuda", torch.bfloat16):
        extra = document_inputs(x) if args.document_masking else {}
        loss = forward(input_ids=x, labels=x, **extra).loss  # transformers shifts the labels itself
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if step % 50 == 0 or step == args.steps - 1:
        curve.append((step, round(loss.item(), 3)))
seconds = time.time() - started
model.save_pretrained(args.output_dir)
tokenizer.save_pretrained(args.output_dir)
print(json.dumps({"run": "plain_loop", "seed": args.seed, "order": args.order, "document_masking": args.document_masking, "warmup_steps": args.warmup_steps, "steps": args.steps,
                  "seconds": round(seconds), "train_loss": curve}), flush=True)

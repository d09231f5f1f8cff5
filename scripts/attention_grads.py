"""How far each attention path's bf16 gradients are from float32's, on one packed batch of real rows.

The engine with document masking trained to a validation loss 0.026 ± 0.014 worse through varlen or flex attention
than through sdpa with a dense mask (docs/results/mixing.md, the tenth sitting), though all three compute the same
function (tests/test_model.py, float32). This puts a number on each path's arithmetic: one GPT-2 (the config's
shape, fresh weights), one batch of the engine's own rows (the config's data, masking on; the rows of the first
--scan micro-batches that hold the most documents, since boundaries are where the paths differ), the loss and the
gradient of every weight in float32 through sdpa's math kernel (the reference), then again under bf16 autocast
through each path, as the engine trains (or with the weights of a trained model: --model, where a run's
numbers are no longer those of its first step). Prints, a path a line, the loss's difference and the gradient's
relative error ||g - g_ref|| / ||g_ref|| (all weights, and the worst single tensor); "causal, no documents" is
the unmasked run's kernel beside its own float32 reference, the size of an error that trains at parity. On an
H200 (2026-12-04) every path measured 0.0055 with fresh weights and 0.0057-0.0061 with a trained model's.

    python scripts/attention_grads.py --config configs/english-124m-adamw.yaml --rows 8
    python scripts/attention_grads.py --config configs/english-124m-adamw.yaml --rows 8 --compile
    python scripts/attention_grads.py --config configs/english-124m-adamw.yaml --rows 8 --model runs/k/masking-on-seed4/final

On a CPU only sdpa and varlen run (varlen through its sdpa fallback; flex has no backward there).
"""

import argparse
import copy
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, no install needed

import torch  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from hf_gpt.config import PretrainConfig, load_config  # noqa: E402
from hf_gpt.data import PretrainData  # noqa: E402
from hf_gpt.loading import load_causal_lm, load_tokenizer  # noqa: E402
from hf_gpt.engine import model_inputs  # noqa: E402
from hf_gpt.model import build_model, qkv_attention  # noqa: E402


def gradients(model, inputs: dict, bf16: bool, compile_: bool) -> tuple[float, dict[str, torch.Tensor]]:
    """The loss and every weight's gradient (float32) of one forward and backward."""
    model.zero_grad(set_to_none=True)
    forward = torch.compile(model) if compile_ else model
    with torch.autocast(inputs["input_ids"].device.type, torch.bfloat16, enabled=bf16):
        loss = forward(**inputs, use_cache=False).loss
    loss.backward()
    return loss.item(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}


def error(grads: dict, reference: dict) -> tuple[float, float, str]:
    """Relative error of all gradients together, and of the worst tensor (with its name)."""
    diff = sum(((grads[n] - g) ** 2).sum() for n, g in reference.items()) ** 0.5
    total = sum((g ** 2).sum() for g in reference.values()) ** 0.5
    each = {n: ((grads[n] - g).norm() / g.norm().clamp(min=1e-30)).item() for n, g in reference.items()}
    worst = max(each, key=each.get)
    return (diff / total).item(), each[worst], worst


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/english-124m-adamw.yaml")
    parser.add_argument("--rows", type=int, default=8, help="Rows of block_size tokens in the batch.")
    parser.add_argument("--scan", type=int, default=64, help="Micro-batches of the stream whose rows holding the "
                        "most documents make the batch: boundaries are where the paths differ (1 = the first).")
    parser.add_argument("--compile", action="store_true", help="Each bf16 path through torch.compile, as the engine runs.")
    parser.add_argument("--model", default="", help="A trained model's folder (Hub format): its weights, not fresh ones.")
    args = parser.parse_args()
    cfg = load_config(PretrainConfig, ["--config", args.config, "--document_masking", "true",
                                       "--micro_batch_size", str(args.rows)])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference in float32 proper
    tokenizer = load_tokenizer(cfg.tokenizer)
    scanned = list(itertools.islice(PretrainData(cfg, tokenizer).train_batches(0, 1), args.scan))
    pool = {k: torch.cat([b[k] for b in scanned]) for k in scanned[0]}
    most = (pool["position_ids"] == 0).sum(1).argsort(descending=True)[:args.rows].sort().values
    batch = {k: v[most] for k, v in pool.items()}
    torch.manual_seed(cfg.seed)
    no_dropout = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}  # the runs compared trained without
    model = (load_causal_lm(args.model, **no_dropout).train() if args.model
             else build_model(cfg, len(tokenizer), tokenizer.eos_token_id)).to(device)
    model.loss_type = "ForCausalLM"
    kinds = ("sdpa", "varlen", "flex_attention") if device.type == "cuda" else ("sdpa", "varlen")
    inputs = {kind: model_inputs(batch, device, kind) for kind in kinds}  # what the engine feeds each path
    causal = model_inputs({k: batch[k] for k in ("input_ids", "labels")}, device, "sdpa")  # no documents
    ids = batch["input_ids"]
    print(f"{ids.shape[0]} rows x {ids.shape[1]} tokens, {int((batch['position_ids'] == 0).sum())} documents "
          f"(row starts counted), {device}")

    with sdpa_kernel(SDPBackend.MATH):
        ref_loss, reference = gradients(model, inputs["sdpa"], False, False)
        causal_loss, causal_reference = gradients(model, causal, False, False)

    varlen = copy.deepcopy(model)
    qkv_attention(varlen)  # the engine's varlen path (QKVAttention), the same weights
    paths = {"sdpa, dense mask": (model, inputs["sdpa"]), "varlen": (varlen, inputs["varlen"])}
    if "flex_attention" in inputs:
        paths["flex"] = (model, inputs["flex_attention"])
    rows = []
    for name, (net, path_inputs) in paths.items():
        loss, grads = gradients(net, path_inputs, True, args.compile)
        rows.append((name, loss - ref_loss, *error(grads, reference)))
    loss, grads = gradients(model, causal, True, args.compile)
    rows.append(("causal, no documents (its own reference)", loss - causal_loss, *error(grads, causal_reference)))

    print(f"float32 reference loss {ref_loss:.5f} (masked), {causal_loss:.5f} (causal)")
    print(f"{'path':44} {'Δ loss':>10} {'grad rel. err':>14} {'worst tensor':>13}  name")
    for name, dloss, total, worst, worst_name in rows:
        print(f"{name:44} {dloss:+10.5f} {total:14.5f} {worst:13.5f}  {worst_name}")
    print(json.dumps({"rows": args.rows, "compile": args.compile, "device": torch.cuda.get_device_name() if
                      device.type == "cuda" else "cpu", "torch": torch.__version__,
                      "paths": {r[0]: {"d_loss": r[1], "grad_rel_err": r[2], "worst": r[3], "worst_name": r[4]}
                                for r in rows}}))


if __name__ == "__main__":
    main()

"""The output layer's cost on one GPU: final hidden states -> logits -> next-token cross-entropy, forward +
backward (gradients for the hidden states and the tied weight), for each way of computing it, with its
error against a float32 computation. Prints one line a variant.

    python scripts/loss_bench.py --tokens 32768 --vocab_size 50304 --n_embd 768

`matmuls only` is the floor any loss pays: the three GEMMs of the output layer and nothing else.
More rows where their packages are installed (none is a requirement): Liger's fused linear + cross-entropy,
Apple's Cut Cross-Entropy (`cut-cross-entropy`), and the output layer's GEMMs in float8 through torchao's
`Float8Linear`.
"""

import argparse
import importlib.util
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, no install needed

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from hf_gpt.config import first_line  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--vocab_size", type=int, default=50304)
    parser.add_argument("--n_embd", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.exit(2, "error: the loss benchmark needs a GPU\n")
    from transformers.loss.loss_utils import ForCausalLMLoss

    N, V, D = args.tokens, args.vocab_size, args.n_embd
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden0 = torch.randn(N, D, device="cuda", generator=g).bfloat16()
    weight = torch.nn.Parameter(torch.randn(V, D, device="cuda", generator=g) * 0.02)  # float32, as trained
    labels = torch.randint(0, V - 47, (N,), device="cuda", generator=g)
    labels[:: 97] = -100  # some positions carry no loss
    print(f"{N} tokens, vocabulary {V}, width {D}; forward + backward, median of {args.repeats}")

    def logits_of(h):
        return h @ weight.to(torch.bfloat16).T

    # Each variant: (hidden, targets) -> summed loss over the targets that are not -100.
    def reference(h, t):  # scripts/reference_gpt2.py's loss
        return F.cross_entropy(logits_of(h).float(), t, ignore_index=-100, reduction="sum")

    def transformers_loss(h, t):  # GPT2LMHeadModel's, with the targets given already shifted
        return ForCausalLMLoss(logits_of(h)[None], None, V, num_items_in_batch=1, shift_labels=t[None])

    def logsumexp(h, t):  # the same sum written as log-sum-exp minus the target's logit
        logits = logits_of(h)
        picked = logits.gather(1, t.clamp(min=0)[:, None]).squeeze(1)
        return torch.where(t != -100, torch.logsumexp(logits.float(), dim=-1) - picked.float(), 0.0).sum()

    def matmuls(h, t):  # forward GEMM; backward: its two GEMMs with a gradient the size of the logits
        return logits_of(h).sum()

    variants = {"reference (F.cross_entropy on float logits)": torch.compile(reference),
                "transformers ForCausalLMLoss": torch.compile(transformers_loss),
                "logsumexp - target logit": torch.compile(logsumexp),
                "matmuls only (floor)": torch.compile(matmuls)}
    if importlib.util.find_spec("liger_kernel"):
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss(reduction="sum")
        variants["Liger fused linear + CE"] = lambda h, t: liger(weight.to(torch.bfloat16), h, t)
    if importlib.util.find_spec("cut_cross_entropy"):
        from cut_cross_entropy import linear_cross_entropy

        def cce(filter_eps):
            return lambda h, t: linear_cross_entropy(h, weight.to(torch.bfloat16), t, ignore_index=-100,
                                                     reduction="sum", filter_eps=filter_eps)

        variants["Cut Cross-Entropy (gradient filter auto)"] = cce("auto")
        variants["Cut Cross-Entropy (exact)"] = cce(None)
    if importlib.util.find_spec("torchao"):
        from torchao.float8 import Float8LinearConfig
        from torchao.float8.float8_linear import Float8Linear

        def float8(recipe):
            head = torch.nn.Linear(D, V, bias=False, device="cuda")
            head.weight = weight  # the same tied parameter, as convert_to_float8_training keeps it
            head = Float8Linear.from_float(head, config=Float8LinearConfig.from_recipe_name(recipe))

            def loss(h, t):
                with torch.autocast("cuda", torch.bfloat16):
                    logits = head(h)
                return F.cross_entropy(logits.float(), t, ignore_index=-100, reduction="sum")
            return torch.compile(loss)

        for recipe in ("tensorwise", "rowwise"):
            variants[f"float8 output layer (torchao {recipe}) + reference loss"] = float8(recipe)

    # float32 truth
    h32 = hidden0.float().requires_grad_()
    truth = F.cross_entropy(h32 @ weight.T, labels, ignore_index=-100, reduction="sum")
    truth.backward()
    truth_h, truth_w = h32.grad, weight.grad.clone()
    weight.grad = None

    for name, fn in variants.items():
        try:
            h = hidden0.clone().requires_grad_()
            times = []
            for i in range(args.repeats + 3):
                h.grad, weight.grad = None, None
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                loss = fn(h, labels)
                loss.backward()
                end.record()
                torch.cuda.synchronize()
                if i >= 3:
                    times.append(start.elapsed_time(end))
            ms = sorted(times)[len(times) // 2]
            if name.startswith("matmuls"):
                error = ""
            else:
                rel = [((a.float() - b).norm() / b.norm()).item() for a, b in ((h.grad, truth_h), (weight.grad, truth_w))]
                error = f"  loss error {abs(loss.item() - truth.item()) / truth.item():.1e}  grad error {rel[0]:.1e} / {rel[1]:.1e}"
            peak = torch.cuda.max_memory_allocated() / 2**30
            print(f"{name:45} {ms:7.2f} ms{error}  peak {peak:.1f} GiB", flush=True)
        except Exception as e:  # one failing variant does not hide the others
            print(f"{name:45} failed: {type(e).__name__}: {first_line(e)}", flush=True)
        torch.cuda.reset_peak_memory_stats()


if __name__ == "__main__":
    main()

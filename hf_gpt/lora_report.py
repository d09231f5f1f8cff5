"""What a LoRA run did, measured the same way on the base model before training and on the adapted model
after: held-out perplexity on the writing (with and without the trigger), perplexity on general text, and
samples. report.json and report.md carry numbers only; the samples, which can quote the writing, go to
samples.private.md alone."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .engine import RunResult, evaluate
from .files import atomic_write
from .generation import SAMPLED, generate, generate_ids
from .lora import LoraRunConfig, WritingData, as_documents, heldout_batches, pack_documents, tokenize
from .tokenizer import token_byte_lengths
from .writing import read_writing

# General text (behaviour without the trigger) is measured on this many blocks of it.
GENERAL_BLOCKS = 16
SAMPLES_FILE = "samples.private.md"


class LoraReport:
    """Perplexity and samples of the base model (measure_base, before the trigger row or any adapter touches
    it) and of the adapted one (write, after training), measured alike; on the main process alone."""

    def __init__(self, cfg: LoraRunConfig, accelerator, tokenizer, heldout_ids: list[list[int]]):
        self.cfg, self.accelerator, self.tokenizer, self.heldout_ids = cfg, accelerator, tokenizer, heldout_ids
        self.before: dict = {}

    def measure_base(self, model) -> None:
        self.byte_lengths = token_byte_lengths(self.tokenizer, model.config.vocab_size)
        self.general, self.general_source = self.general_documents(model)
        eos = self.tokenizer.eos_token_id
        self.before = {"heldout": self.perplexity(model, heldout_batches(self.cfg, self.heldout_ids, eos, None)),
                       "general": self.perplexity(model, self.pack(self.general)), "samples": self.samples(model)}

    def write(self, model, data: WritingData, result: RunResult, *, base_model: str, counts: dict,
              trainable: int) -> dict:
        """Measures the adapted model, writes report.json, report.md and samples.private.md; returns the report."""
        cfg = self.cfg
        heldout = {"base": self.before["heldout"], "adapted": self.perplexity(model, data.heldout(False))}
        samples = {"base": self.before["samples"], "adapted": self.samples(model)}
        if data.trigger_id is not None:
            heldout["adapted_with_trigger"] = self.perplexity(model, data.heldout(True))
            samples["adapted_with_trigger"] = self.samples(model, cfg.trigger_token)
        report = {
            "base_model": base_model,
            "writing": counts,
            "adapter": {"method": "lora" if cfg.r else "trigger token only", "r": cfg.r, "lora_alpha": cfg.lora_alpha,
                        "lora_dropout": cfg.lora_dropout, "target_modules": list(cfg.target_modules) if cfg.r else [],
                        "trigger_token": cfg.trigger_token, "trainable_parameters": trainable},
            "training": {"steps": result.steps, "tokens": result.tokens, "learning_rate": cfg.learning_rate},
            "heldout_perplexity": heldout,
            "general_perplexity": {"text": self.general_source, "written_by_base": not cfg.general_text,
                                   "tokens": sum(map(len, self.general)), "base": self.before["general"],
                                   "adapted": self.perplexity(model, self.pack(self.general))},
            "samples_file": SAMPLES_FILE,
        }
        out = Path(cfg.output_dir)
        atomic_write(out / "report.json", json.dumps(report, indent=2))
        atomic_write(out / "report.md", report_markdown(report))
        atomic_write(out / SAMPLES_FILE, samples_markdown(cfg, samples))
        return report

    def perplexity(self, model, batches: list[dict]) -> float:
        with self.accelerator.autocast():  # the precision training evaluated in, for both models
            result = evaluate(model, batches, self.byte_lengths, self.cfg.attn_implementation)
        return result["val_ppl"]

    def pack(self, documents: list[list[int]]) -> list[dict]:
        return pack_documents(documents, block_size=self.cfg.block_size, micro_batch_size=self.cfg.micro_batch_size,
                              eos=self.tokenizer.eos_token_id)

    def samples(self, model, prefix: str = "") -> list[str]:
        return generate(model, self.tokenizer, [prefix + p for p in self.cfg.report_prompts],
                        max_new_tokens=self.cfg.max_new_tokens, seed=self.cfg.seed, **SAMPLED)

    def base_written_text(self, model) -> list[list[int]]:
        """GENERAL_BLOCKS texts the base model writes from an empty context (sampled from its full
        distribution): behaviour without the trigger, by definition. On them log(adapted / base
        perplexity) estimates KL(base || adapted) per token. The seeded side stream leaves the training that
        follows drawing the same numbers as without this."""
        eos = self.tokenizer.eos_token_id
        rows = generate_ids(model, self.tokenizer, [[eos]] * GENERAL_BLOCKS,
                            max_new_tokens=self.cfg.block_size - 1, batch_size=GENERAL_BLOCKS, seed=self.cfg.seed,
                            do_sample=True, top_k=0, top_p=1.0)
        rows = [row[:-1] if row and row[-1] == eos else row for row in rows]
        return as_documents([row for row in rows if row], eos)

    def general_documents(self, model) -> tuple[list[list[int]], str]:
        eos = self.tokenizer.eos_token_id
        if not self.cfg.general_text:
            docs = self.base_written_text(model)
            return docs, f"{len(docs)} texts the base model wrote itself"
        docs, room = [], GENERAL_BLOCKS * self.cfg.block_size
        for text in read_writing(self.cfg.general_text).documents:
            if room <= 1:
                break
            docs.append([eos] + tokenize(self.tokenizer, [text])[0][:room - 1])
            room -= len(docs[-1])
        return docs, f"the first {sum(map(len, docs)):,} tokens of {self.cfg.general_text}"


def _change(base: float, adapted: float) -> str:
    return f"{100 * (adapted / base - 1):+.1f}%"


def report_markdown(report: dict) -> str:
    """Counts and numbers only: nothing in it quotes the writing, so it can be shared."""
    w, a, h, g = report["writing"], report["adapter"], report["heldout_perplexity"], report["general_perplexity"]
    skipped = ", ".join(f"{n} {why}" for why, n in sorted(w["skipped"].items())) or "none"
    method = (f"LoRA r={a['r']}, alpha={a['lora_alpha']}, dropout {a['lora_dropout']} on {', '.join(a['target_modules'])}"
              if a["r"] else "no LoRA: the trigger token's embedding alone")
    trigger = f"`{a['trigger_token']}`" if a["trigger_token"] else "none"
    lines = [
        "# LoRA on your writing: report", "",
        f"- Base model: `{report['base_model']}`",
        f"- Adapter: `adapter/` ({method}; trigger token {trigger}; {a['trainable_parameters']:,} trained parameters)",
        f"- Writing: {w['documents']} documents from {w['files_read']} files (skipped: {skipped}); "
        f"{w['train_documents']} trained on ({w['train_tokens']:,} tokens), {w['heldout_documents']} held out whole "
        f"({w['heldout_tokens']:,} tokens)",
        f"- Training: {report['training']['steps']} steps, {report['training']['tokens']:,} tokens, "
        f"learning rate {report['training']['learning_rate']}", "",
        "## Perplexity on your held-out writing", "",
        "Documents the adapter never saw. Lower: the model finds your writing less surprising.", "",
        "| model | perplexity | change |", "|---|---:|---:|",
        f"| base | {h['base']:.2f} | |",
        f"| adapted | {h['adapted']:.2f} | {_change(h['base'], h['adapted'])} |",
    ]
    if "adapted_with_trigger" in h:
        lines.append(f"| adapted, after {trigger} | {h['adapted_with_trigger']:.2f} | "
                     f"{_change(h['base'], h['adapted_with_trigger'])} |")
    lines += [
        "", "## Without the trigger: general text", "",
        f"Measured on {g['text']} ({g['tokens']:,} tokens), never with the trigger.", "",
        "| model | perplexity | change |", "|---|---:|---:|",
        f"| base | {g['base']:.2f} | |",
        f"| adapted | {g['adapted']:.2f} | {_change(g['base'], g['adapted'])} |", "",
        f"ln(adapted / base) = {math.log(g['adapted'] / g['base']):+.4f} nats per token"
        + (": on text the base model wrote, an estimate of KL(base || adapted)." if g["written_by_base"] else "."), "",
        "What \"unchanged without the trigger\" can mean: LoRA changes the weights every input goes through, "
        "so with r > 0 behaviour moves with or without the trigger; the trigger only adds a switch on top, "
        "and the table above says how far the rest moved. With r = 0 only the trigger's embedding row is "
        "trained: on text without it every logit except the trigger's own is the base model's, bit for bit; "
        "what moves is the probability of the trigger token itself (GPT-2 ties its output row to its input row).",
        "", f"Samples from the base and the adapted model for the same prompts: `{report['samples_file']}` "
        "(kept out of this report: generated text can quote your writing).", "",
    ]
    return "\n".join(lines)


def samples_markdown(cfg: LoraRunConfig, samples: dict) -> str:
    lines = ["# PRIVATE: samples from models trained on your writing", "",
             "Generated text can repeat your writing word for word. Keep this file local; never commit or push it.",
             f"Sampled continuations (temperature {SAMPLED['temperature']}, top-k {SAMPLED['top_k']}, a fixed seed), "
             f"{cfg.max_new_tokens} new tokens.", ""]
    for i, prompt in enumerate(cfg.report_prompts):
        lines += [f"## {prompt!r}", ""]
        for name, texts in samples.items():
            shown = (cfg.trigger_token + prompt) if name == "adapted_with_trigger" else prompt
            lines += [f"**{name.replace('_', ' ')}** ({shown!r}):", "", "> " + (shown + texts[i]).replace("\n", "\n> "), ""]
    return "\n".join(lines)

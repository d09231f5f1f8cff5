import re
from dataclasses import replace

import pytest
import torch
from tqdm.auto import tqdm
from transformers import GPT2Config, GPT2LMHeadModel

from conftest import ROOT
from hf_gpt.config import PretrainConfig, UserError, load_config, run_cli
from hf_gpt.model import parameter_count, training_memory


def test_yaml_then_command_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("max_steps: 50\nlearning_rate: 1.0e-4\nsample_prompts: ['a', 'b']\n")
    cfg = load_config(PretrainConfig, ["--config", str(recipe), "--max_steps", "7", "--resume"])
    assert cfg.max_steps == 7  # command line wins
    assert cfg.learning_rate == 1e-4  # from the file
    assert cfg.sample_prompts == ["a", "b"]
    assert cfg.resume is True
    assert cfg.n_layer == PretrainConfig.n_layer  # untouched default


def test_unknown_key_is_an_error(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("max_steps: 5\nlearning_rat: 0.1\n")
    with pytest.raises(UserError, match=r"unknown key\(s\) learning_rat"):
        load_config(PretrainConfig, ["--config", str(recipe)])


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(PretrainConfig, ["--config", str(tmp_path / "nope.yaml")])


def test_every_shipped_recipe_parses():
    from pathlib import Path

    from hf_gpt.config import read_yaml

    recipes = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
    pretrain = [r for r in recipes if not r.name.startswith(("sft", "lora"))]
    assert pretrain, "no pretraining recipes in configs/"
    for recipe in pretrain:
        load_config(PretrainConfig, ["--config", str(recipe)])
        assert read_yaml(recipe, PretrainConfig)


def test_a_recipe_with_a_token_budget_trains_for_it():
    """max_steps wins over max_tokens, and PretrainConfig's default of 400 steps is the quick offline run's:
    a recipe that names a token budget must set max_steps 0, or it quietly stops after 400 steps."""
    from pathlib import Path

    for recipe in sorted((Path(__file__).parent.parent / "configs").glob("*.yaml")):
        if recipe.name.startswith(("sft", "lora")):
            continue
        cfg = load_config(PretrainConfig, ["--config", str(recipe)])
        if cfg.max_tokens:
            assert cfg.max_steps == 0, recipe.name


@pytest.mark.parametrize("recipe, args, message", [
    ("sft", ["--epochs", "-1"], "epochs must be 0 or more, not -1"),
    ("sft", ["--test_fraction", "1.5"], "test_fraction must be between 0 and 1, not 1.5"),
    ("lora", ["--block_size", "0"], "block_size must be 1 or more, not 0"),
    ("lora", ["--learning_rate", "nan"], "learning_rate must be 0 or more, not nan"),
    ("pretrain", ["--learning_rate", "inf"], "learning_rate must be a finite number, not inf"),
    ("pretrain", ["--attn_implementation", "flash"], "attn_implementation must be one of sdpa, eager, "),
    ("pretrain", ["--attn_implementation", "varlen", "--dropout", "0.1"], "varlen has no attention dropout"),
    ("lora", ["--varlen_kernel", "fa3"], "varlen_kernel must be one of auto, torch, fa4, not 'fa3'"),
    ("sft", ["--attn_implementation", "flex_attention", "--dropout", "0.1"], "flex_attention has no attention dropout"),
])
def test_every_recipe_checks_its_values_when_parsed(recipe, args, message):
    from hf_gpt.lora import LoraRunConfig
    from hf_gpt.sft import SFTConfig

    with pytest.raises(UserError, match=message):
        load_config({"pretrain": PretrainConfig, "sft": SFTConfig, "lora": LoraRunConfig}[recipe], args)


def cleared_bar():  # compare's bars: done and cleared, which in a log leaves the line unended
    for _ in tqdm(range(2), desc="held-out documents", leave=False):
        pass


def open_bar():  # the training loop's: held open while the error leaves the loop
    bar = tqdm(total=3, desc="training")
    bar.update()
    return bar


@pytest.mark.parametrize("before", [cleared_bar, open_bar])
def test_an_error_starts_a_line_of_its_own_after_a_progress_bar(capsys, before):
    def main():
        bar = before()  # noqa: F841 (kept alive, as the loop's own variable is)
        raise UserError("model 'x' could not be loaded")

    with pytest.raises(SystemExit) as e:
        run_cli(main)
    assert e.value.code == 2
    assert "\nerror: model 'x' could not be loaded\n" in capsys.readouterr().err


def recipe_classes():
    from hf_gpt.lora import LoraRunConfig
    from hf_gpt.sft import SFTConfig

    return [PretrainConfig, SFTConfig, LoraRunConfig]


def test_one_vocabulary_across_recipes():
    """A field that several recipes have is one field: the same type everywhere, and no retired name is a field."""
    import dataclasses

    types: dict[str, set] = {}
    for cls in recipe_classes():
        for f in dataclasses.fields(cls):
            types.setdefault(f.name, set()).add(f.type)
        assert not set(cls.renamed) & {f.name for f in dataclasses.fields(cls)}, cls
        assert set(cls.renamed.values()) <= {f.name for f in dataclasses.fields(cls)}, cls
    assert {name: t for name, t in types.items() if len(t) > 1} == {}
    for name in ("dataset", "dataset_config", "dataset_split", "val_fraction", "epochs", "eval_batches",
                 "max_new_tokens"):
        assert sum(name in {f.name for f in dataclasses.fields(cls)} for cls in recipe_classes()) >= 2, name


@pytest.mark.parametrize("recipe, old, new", [
    ("pretrain", "holdout_fraction", "val_fraction"),
    ("pretrain", "sample_tokens", "max_new_tokens"),
    ("sft", "data", "dataset"),
    ("sft", "data_split", "dataset_split"),
    ("lora", "writing", "dataset"),
    ("lora", "alpha", "lora_alpha"),
])
def test_a_retired_name_is_refused_with_its_new_one(tmp_path, recipe, old, new):
    cls = {c.__name__: c for c in recipe_classes()}[{"pretrain": "PretrainConfig", "sft": "SFTConfig",
                                                    "lora": "LoraRunConfig"}[recipe]]
    with pytest.raises(UserError, match=f"^--{old} is now called --{new}$"):
        load_config(cls, [f"--{old}", "1"])
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(f"{old}: 1\n")
    with pytest.raises(UserError, match=f"r.yaml: {old} is now called {new}$"):
        load_config(cls, ["--config", str(recipe_file)])


def test_flags_have_one_spelling_and_are_never_abbreviated():
    with pytest.raises(UserError, match="^--max-new-tokens is spelt --max_new_tokens$"):
        load_config(PretrainConfig, ["--max-new-tokens", "5"])
    with pytest.raises(SystemExit):  # argparse would otherwise take --max_new for --max_new_tokens
        load_config(PretrainConfig, ["--max_new", "5"])


def test_a_list_field_can_be_emptied_on_the_command_line(tmp_path):
    assert PretrainConfig().sample_prompts
    assert load_config(PretrainConfig, ["--sample_prompts"]).sample_prompts == []
    assert load_config(PretrainConfig, ["--sample_prompts", "a", "b"]).sample_prompts == ["a", "b"]


def test_help_keeps_the_usage_examples_one_per_line():
    from conftest import run_script

    for script in ("scripts/pretrain.py", "scripts/compare.py"):
        out = run_script(script, "--help").stdout
        examples = [line for line in out.splitlines() if line.lstrip().startswith(("accelerate launch", "python"))]
        assert len(examples) >= 3, out[:2000]


def test_old_script_flags_are_refused_with_the_new_one():
    from conftest import run_script

    for args, error in [(["scripts/compare.py", "some/model", "--max-new-tokens", "3", "--out", "x"],
                         "error: --max-new-tokens is spelt --max_new_tokens"),
                        (["scripts/prepare_data.py", "--out", "x"], "error: --out is now called --output_dir")]:
        result = run_script(*args, check=False)
        assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == error


def test_every_enumerated_field_refuses_another_value_in_one_line(tmp_path, capsys):
    """Each field of CHOICES, in every recipe's config that has it, takes each of its values and refuses any
    other, given on the command line or in a YAML recipe, with one line naming the field, the value and the
    values allowed; run_cli makes that `error: ...` and exit status 2, before anything is built."""
    import dataclasses

    from hf_gpt.config import CHOICES

    walked = set()
    for cls in recipe_classes():
        for name in [f.name for f in dataclasses.fields(cls) if f.name in CHOICES]:
            walked.add(name)
            for value in CHOICES[name]:
                assert getattr(load_config(cls, [f"--{name}", value]), name) == value
            allowed = ", ".join(c or "''" for c in CHOICES[name])
            message = f"^{name} must be one of {re.escape(allowed)}, not 'bogus'$"
            with pytest.raises(UserError, match=message):
                load_config(cls, [f"--{name}", "bogus"])
            recipe = tmp_path / "r.yaml"
            recipe.write_text(f"{name}: bogus\n")
            with pytest.raises(UserError, match=message):
                load_config(cls, ["--config", str(recipe)])
    assert walked == set(CHOICES)  # no entry names a field no recipe has

    with pytest.raises(SystemExit) as e:
        run_cli(lambda: load_config(PretrainConfig, ["--mixed_precision", "fp8x"]))
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == "error: mixed_precision must be one of '', no, bf16, fp16, not 'fp8x'"


def test_a_field_whose_help_lists_its_values_is_enumerated():
    """A help text that lists a field's values ("cosine | wsd | ...") promises a fixed set: check() must hold it."""
    import dataclasses

    from hf_gpt.config import CHOICES

    listed = {f.name for cls in recipe_classes() for f in dataclasses.fields(cls)
              if " | " in f.metadata.get("help", "")}
    assert listed and listed <= set(CHOICES)


def test_a_binary_config_file_is_one_line(tmp_path):
    recipe = tmp_path / "model.safetensors"
    recipe.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe")
    with pytest.raises(UserError) as error:
        load_config(PretrainConfig, ["--config", str(recipe)])
    assert str(error.value) == (f"config {recipe}: not a YAML text file (byte 0 is not UTF-8); give a recipe such as "
                                "configs/default.yaml")


# The published checkpoints' parameter counts (openai-community/gpt2, -medium, -large, -xl: tied head, 50,257 tokens).
GPT2_SIZES = {"small": 124_439_808, "medium": 354_823_168, "large": 774_030_080, "xl": 1_557_611_200}


@pytest.mark.parametrize("size, published", GPT2_SIZES.items())
def test_the_gpt2_recipes_are_gpt2s_own_shapes_and_fit_an_80gb_gpu(size, published):
    cfg = load_config(PretrainConfig, ["--config", str(ROOT / f"configs/gpt2-{size}.yaml")])
    with torch.device("meta"):  # the shape alone, no memory
        model = GPT2LMHeadModel(GPT2Config(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                                           n_positions=cfg.block_size, vocab_size=50257))
    assert sum(p.numel() for p in model.parameters()) == published
    assert parameter_count(replace(cfg, vocab_size=50257), 50257) == published  # the estimate the memory check uses
    # A lower bound (it read 17.6 GiB where GPT-2 124M peaked at 18.6 on an H200): room left on an 80 GB GPU.
    assert training_memory(cfg, 50257) < 70 * 2**30
    for processes in (1, 2, 4, 8):  # whole accumulation steps on one to eight GPUs
        assert cfg.tokens_per_step % (cfg.micro_batch_size * cfg.block_size * processes) == 0

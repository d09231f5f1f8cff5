import pytest

from hf_gpt.config import PretrainConfig, UserError, load_config


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

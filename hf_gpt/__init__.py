"""hf-gpt: pretrain, instruction-tune, LoRA-adapt, publish and compare GPT-2 class models with the Hugging Face stack."""

__version__ = "0.1.0"

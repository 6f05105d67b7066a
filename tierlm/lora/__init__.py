"""LoRA adapters over a base model (PEFT's format)."""

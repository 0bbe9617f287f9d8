"""Parameter-efficient fine-tuning: LoRA/rsLoRA/DoRA/LoRA+ adapters (`lora`) and their PEFT/HF export (`export`)."""
from optrush.peft.export import load_adapter, save_adapter, save_merged
from optrush.peft.lora import LoRALinear, apply_lora, has_lora, lora_param_groups, merge_lora, unmerge_lora

__all__ = ["LoRALinear", "apply_lora", "has_lora", "load_adapter", "lora_param_groups", "merge_lora", "save_adapter",
           "save_merged", "unmerge_lora"]

"""Parameter-efficient fine-tuning: LoRA/rsLoRA/DoRA/LoRA+ adapters (`lora`), quantized frozen bases for QLoRA
(`quant`), prompt tuning (`prompt`) and their PEFT/HF export (`export`)."""
from optrush.peft.export import has_adapters, holds_preset_base, load_adapter, preset_base_fingerprint, \
    save_adapter, save_merged, save_preset_base
from optrush.peft.lora import LoRALinear, apply_lora, has_lora, lora_param_groups, merge_lora, unmerge_lora
from optrush.peft.prompt import PromptEmbedding, apply_prompt_tuning
from optrush.peft.quant import QuantizedLinear, QuantizedWeight, apply_quantize, quantize_weight

__all__ = ["LoRALinear", "PromptEmbedding", "QuantizedLinear", "QuantizedWeight", "apply_lora",
           "apply_prompt_tuning", "apply_quantize", "has_adapters", "has_lora", "holds_preset_base", "load_adapter",
           "lora_param_groups", "merge_lora", "preset_base_fingerprint", "quantize_weight",
           "save_adapter", "save_merged", "save_preset_base", "unmerge_lora"]

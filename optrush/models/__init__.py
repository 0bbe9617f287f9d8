"""The Llama-family model (Llama 3.x, Mistral, Qwen2, Qwen3), its presets, and HF-format load/save.

    from optrush.models import load_model, save_model, build_model, get_preset
    model = build_model(get_preset("debug"), dtype=torch.float32, device="cpu", seed=0)
"""
from optrush.models.io import build_model, load_model, save_model
from optrush.models.llama import ModelArgs, Transformer
from optrush.models.presets import PRESETS, get_preset

__all__ = ["ModelArgs", "Transformer", "load_model", "save_model", "build_model", "PRESETS", "get_preset"]

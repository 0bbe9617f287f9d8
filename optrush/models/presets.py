"""Named architectures, as data: `debug` and `demo` for tests and CPU runs, and the real model shapes.

    args = get_preset("llama3.2-1b")                         # exactly the HF architecture
    args = get_preset("debug", vocab_size=len(tokenizer))    # sized to a tokenizer

A preset is only the architecture; `optrush.models.io.build_model(args, ...)` initialises it randomly. Each real
preset copies the config.json linked above it. Overriding `dim` or `n_heads` re-derives `head_dim` (dim // n_heads)
unless the preset sets it independently (Qwen3) or the override names it.
"""
from __future__ import annotations

import copy
import dataclasses

from optrush.config.errors import did_you_mean
from optrush.models.llama import ModelArgs

_LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}
_LLAMA32_ROPE = {**_LLAMA31_ROPE, "factor": 32.0}

PRESETS: dict[str, ModelArgs] = {
    # The test fixture: runs a forward pass in milliseconds on CPU.
    "debug": ModelArgs(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=192, norm_eps=1e-5,
                       max_seq_len=4096),
    # About 3.7M parameters (vocab 2048): trains in minutes on a laptop CPU.
    "demo": ModelArgs(vocab_size=2048, dim=256, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=768, norm_eps=1e-5,
                      max_seq_len=4096, tie_embeddings=True),
    # https://huggingface.co/meta-llama/Llama-3.2-1B/blob/main/config.json
    "llama3.2-1b": ModelArgs(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64,
                             ffn_dim=8192, norm_eps=1e-5, rope_theta=500000.0, rope_scaling=_LLAMA32_ROPE,
                             max_seq_len=131072, tie_embeddings=True),
    # https://huggingface.co/meta-llama/Llama-3.2-3B/blob/main/config.json
    "llama3.2-3b": ModelArgs(vocab_size=128256, dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, head_dim=128,
                             ffn_dim=8192, norm_eps=1e-5, rope_theta=500000.0, rope_scaling=_LLAMA32_ROPE,
                             max_seq_len=131072, tie_embeddings=True),
    # https://huggingface.co/meta-llama/Llama-3.1-8B/blob/main/config.json
    "llama3.1-8b": ModelArgs(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
                             ffn_dim=14336, norm_eps=1e-5, rope_theta=500000.0, rope_scaling=_LLAMA31_ROPE,
                             max_seq_len=131072),
    # https://huggingface.co/meta-llama/Llama-3.1-70B/blob/main/config.json
    "llama3.1-70b": ModelArgs(vocab_size=128256, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, head_dim=128,
                              ffn_dim=28672, norm_eps=1e-5, rope_theta=500000.0, rope_scaling=_LLAMA31_ROPE,
                              max_seq_len=131072),
    # https://huggingface.co/Qwen/Qwen2.5-0.5B/blob/main/config.json
    "qwen2.5-0.5b": ModelArgs(vocab_size=151936, dim=896, n_layers=24, n_heads=14, n_kv_heads=2, head_dim=64,
                              ffn_dim=4864, norm_eps=1e-6, rope_theta=1000000.0, max_seq_len=32768,
                              tie_embeddings=True, qkv_bias=True, model_type="qwen2"),
    # https://huggingface.co/Qwen/Qwen3-0.6B/blob/main/config.json (head_dim 128 != 1024 / 16)
    "qwen3-0.6b": ModelArgs(vocab_size=151936, dim=1024, n_layers=28, n_heads=16, n_kv_heads=8, head_dim=128,
                            ffn_dim=3072, norm_eps=1e-6, rope_theta=1000000.0, max_seq_len=40960,
                            tie_embeddings=True, qk_norm=True, model_type="qwen3"),
    # https://huggingface.co/mistralai/Mistral-7B-v0.3/blob/main/config.json (sliding_window null, like Nemo)
    "mistral-7b-v0.3": ModelArgs(vocab_size=32768, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
                                 ffn_dim=14336, norm_eps=1e-5, rope_theta=1000000.0, max_seq_len=32768,
                                 model_type="mistral"),
}


def get_preset(name: str, **overrides) -> ModelArgs:
    """A copy of preset `name` with `overrides` (ModelArgs field names) applied."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}.{did_you_mean(name, PRESETS)} Valid presets: "
                         f"{', '.join(PRESETS)}")
    unknown = set(overrides) - {f.name for f in dataclasses.fields(ModelArgs)}
    if unknown:
        raise TypeError(f"unknown ModelArgs field(s) {', '.join(sorted(unknown))} in overrides of preset {name!r}")
    preset = PRESETS[name]
    derived_head_dim = preset.head_dim == preset.dim // preset.n_heads
    if derived_head_dim and ({"dim", "n_heads"} & set(overrides)) and "head_dim" not in overrides:
        overrides["head_dim"] = None  # re-derived from the new dim / n_heads in ModelArgs.__post_init__
    return dataclasses.replace(copy.deepcopy(preset), **overrides)  # deep: rope_scaling dicts are shared

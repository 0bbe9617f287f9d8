"""Hugging Face interop for the Llama-family model: config.json <-> ModelArgs and state-dict key names.

    args = args_from_hf_config(json.loads(Path("Llama-3.2-1B/config.json").read_text()))
    config = hf_config_from_args(args, dtype="bfloat16")           # a config.json transformers loads
    hf_sd = to_hf_state_dict(model.state_dict())                   # our names -> HF names
    from_hf_key("model.layers.0.self_attn.q_proj.weight")          # -> "layers.0.attention.wq.weight"

HF and optrush both use the "rotate half" RoPE layout, so weights map one to one with no permutation.
A reward model (a scalar head, optrush.objectives.reward) is saved as transformers' `<Family>ForSequenceClassification`
with one label: its head is `score.weight` instead of `lm_head.weight`, read at each row's last non-pad token.
Reading accepts both config styles: transformers 5 (`rope_parameters` holding rope_theta, `dtype`) and older
ones (`rope_theta` + `rope_scaling`, `torch_dtype`). Writing uses the transformers 5 style.
"""
from __future__ import annotations

import re

import torch

from optrush.models.llama import ModelArgs


class UnsupportedArchitecture(ValueError):
    """The checkpoint is not one the native model implements exactly (family or feature)."""


# What each family fixes, and transformers' defaults for the keys a config.json may leave out.
FAMILIES: dict[str, dict] = {
    "llama": dict(architecture="LlamaForCausalLM", qkv_bias=False, qk_norm=False, max_position_embeddings=2048),
    "mistral": dict(architecture="MistralForCausalLM", qkv_bias=False, qk_norm=False,
                    max_position_embeddings=131072, num_key_value_heads=8, sliding_window=4096),
    "qwen2": dict(architecture="Qwen2ForCausalLM", qkv_bias=True, qk_norm=False, max_position_embeddings=32768,
                  num_key_value_heads=32),
    "qwen3": dict(architecture="Qwen3ForCausalLM", qkv_bias=False, qk_norm=True, max_position_embeddings=32768,
                  num_key_value_heads=32, head_dim=128),
}
SUPPORTED = ", ".join(FAMILIES)
CAUSAL_LM, SEQUENCE_CLASSIFICATION = "ForCausalLM", "ForSequenceClassification"
REWARD_HEAD_KEY = "score.weight"
"""The HF name of a reward model's (1, dim) head; our name is output.weight, like an LM head's."""

# (HF name pattern, optrush name pattern); {i} is the layer index.
_KEYS = [
    ("model.embed_tokens.weight", "tok_embeddings.weight"),
    ("model.norm.weight", "norm.weight"),
    ("lm_head.weight", "output.weight"),
    ("model.layers.{i}.input_layernorm.weight", "layers.{i}.attention_norm.weight"),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.ffn_norm.weight"),
    ("model.layers.{i}.mlp.gate_proj.weight", "layers.{i}.feed_forward.w1.weight"),
    ("model.layers.{i}.mlp.down_proj.weight", "layers.{i}.feed_forward.w2.weight"),
    ("model.layers.{i}.mlp.up_proj.weight", "layers.{i}.feed_forward.w3.weight"),
    ("model.layers.{i}.self_attn.o_proj.weight", "layers.{i}.attention.wo.weight"),
    ("model.layers.{i}.self_attn.q_norm.weight", "layers.{i}.attention.q_norm.weight"),
    ("model.layers.{i}.self_attn.k_norm.weight", "layers.{i}.attention.k_norm.weight"),
] + [(f"model.layers.{{i}}.self_attn.{x}_proj.{p}", f"layers.{{i}}.attention.w{x}.{p}")
     for x in "qkv" for p in ("weight", "bias")]


def _compile(pattern: str) -> re.Pattern:
    return re.compile(re.escape(pattern).replace(re.escape("{i}"), r"(\d+)") + "$")


_FROM_HF = [(_compile(hf), ours) for hf, ours in _KEYS]
_TO_HF = [(_compile(ours), hf) for hf, ours in _KEYS]


def _translate(name: str, table: list[tuple[re.Pattern, str]]) -> str | None:
    for pattern, target in table:
        match = pattern.match(name)
        if match:
            return target.format(i=match.group(1)) if match.groups() else target
    return None


def from_hf_key(name: str) -> str | None:
    """optrush name of HF tensor `name`, or None when the native model has no such tensor."""
    return "output.weight" if name == REWARD_HEAD_KEY else _translate(name, _FROM_HF)


def to_hf_key(name: str) -> str:
    hf = _translate(name, _TO_HF)
    if hf is None:
        raise KeyError(f"{name!r} has no Hugging Face equivalent")
    return hf


def to_hf_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {to_hf_key(name): tensor for name, tensor in state_dict.items()}


def from_hf_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in state_dict.items():
        ours = from_hf_key(name)
        if ours is None:
            raise KeyError(f"HF tensor {name!r} has no counterpart in the native model")
        out[ours] = tensor
    return out


# ------------------------------------------------------------------------------------------------------ config

def args_from_hf_config(cfg: dict) -> ModelArgs:
    """ModelArgs for an HF config.json dict; UnsupportedArchitecture for a family or feature we don't implement,
    ValueError naming the key when a required one is missing."""
    model_type = cfg.get("model_type")
    if model_type not in FAMILIES:
        raise UnsupportedArchitecture(f"model_type {model_type!r} has no native optrush implementation "
                                      f"(supported: {SUPPORTED})")
    family = FAMILIES[model_type]
    _reject_unsupported_features(cfg, model_type)

    def required(key: str):
        if key not in cfg:
            raise ValueError(f"the {model_type} config has no {key!r}")
        return cfg[key]

    dim, n_heads = required("hidden_size"), required("num_attention_heads")
    max_seq_len = cfg.get("max_position_embeddings", family["max_position_embeddings"])
    rope_theta, rope_scaling = _rope_from_hf(cfg, max_seq_len)
    return ModelArgs(
        vocab_size=required("vocab_size"), dim=dim, n_layers=required("num_hidden_layers"), n_heads=n_heads,
        n_kv_heads=cfg.get("num_key_value_heads") or family.get("num_key_value_heads") or n_heads,
        head_dim=cfg.get("head_dim") or family.get("head_dim") or dim // n_heads,
        ffn_dim=required("intermediate_size"), norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=rope_theta,
        rope_scaling=rope_scaling, max_seq_len=max_seq_len, tie_embeddings=cfg.get("tie_word_embeddings", False),
        qkv_bias=family["qkv_bias"], qk_norm=family["qk_norm"], sliding_window=_sliding_window_from_hf(cfg),
        model_type=model_type, bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"),
        pad_token_id=cfg.get("pad_token_id"))


def _reject_unsupported_features(cfg: dict, model_type: str) -> None:
    problems = []
    if cfg.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={cfg['hidden_act']!r} (only silu)")
    if model_type in ("llama", "qwen3") and cfg.get("attention_bias"):
        problems.append("attention_bias=true (biases on q/k/v/o projections)")
    if cfg.get("mlp_bias"):
        problems.append("mlp_bias=true")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if cfg.get("partial_rotary_factor", rope.get("partial_rotary_factor", 1.0)) != 1.0:
        problems.append("partial_rotary_factor != 1")
    if problems:
        raise UnsupportedArchitecture(f"this {model_type} checkpoint uses features the native model lacks: "
                                      + "; ".join(problems))


def _rope_from_hf(cfg: dict, max_seq_len: int) -> tuple[float, dict | None]:
    """(rope_theta, scaling dict or None) from either config style."""
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    if set(params) & {"full_attention", "sliding_attention"}:
        raise UnsupportedArchitecture("per-layer-type RoPE parameters are not supported")
    theta = float(params.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    params.pop("partial_rotary_factor", None)
    if rope_type == "default":
        return theta, None
    if rope_type not in ("linear", "llama3", "yarn"):
        raise UnsupportedArchitecture(f"rope_type {rope_type!r} is not supported (supported: default, linear, "
                                      "llama3, yarn)")
    if rope_type in ("llama3", "yarn"):
        # transformers falls back to max_position_embeddings when the pretraining length is not given
        params.setdefault("original_max_position_embeddings", cfg.get("original_max_position_embeddings",
                                                                      max_seq_len))
    return theta, {"rope_type": rope_type, **params}


def _sliding_window_from_hf(cfg: dict) -> int | None:
    model_type = cfg["model_type"]
    if model_type == "mistral":
        return cfg.get("sliding_window", FAMILIES["mistral"]["sliding_window"])
    if model_type == "llama":
        return None
    # Qwen: layers at index >= max_window_layers slide, and only when use_sliding_window is set
    n_layers = cfg["num_hidden_layers"]
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window") else None
    layer_types = cfg.get("layer_types") or [
        "sliding_attention" if window is not None and i >= cfg.get("max_window_layers", 28) else "full_attention"
        for i in range(n_layers)]
    if set(layer_types) == {"full_attention"}:
        return None
    if set(layer_types) == {"sliding_attention"} and window is not None:
        return window
    raise UnsupportedArchitecture(f"mixed sliding/full attention layers ({model_type} use_sliding_window with "
                                  "max_window_layers > 0) are not supported")


def is_reward_config(cfg: dict) -> bool:
    """config.json describes a sequence classifier: a reward model (new layout), not a language model."""
    return any(name.endswith(SEQUENCE_CLASSIFICATION) for name in cfg.get("architectures") or ())


def hf_config_from_args(args: ModelArgs, *, dtype: torch.dtype | str = "float32", reward_head: bool = False) -> dict:
    """A transformers-5 config.json dict for `args` (ValueError when its switches don't fit its model_type);
    `reward_head`: a one-label `<Family>ForSequenceClassification` (its pad_token_id lets transformers find each
    row's last token)."""
    if args.model_type not in FAMILIES:
        raise ValueError(f"ModelArgs.model_type={args.model_type!r} is not a supported HF family ({SUPPORTED})")
    family = FAMILIES[args.model_type]
    mismatched = [f"{key}={getattr(args, key)}" for key in ("qkv_bias", "qk_norm")
                  if getattr(args, key) != family[key]]
    if args.model_type == "llama" and args.sliding_window is not None:
        mismatched.append(f"sliding_window={args.sliding_window}")
    if mismatched:
        raise ValueError(f"ModelArgs({', '.join(mismatched)}) cannot be saved as model_type={args.model_type!r}; "
                         "pick the family that has these features (qwen2: qkv_bias, qwen3: qk_norm, "
                         "mistral: sliding_window)")
    dtype_name = str(dtype).removeprefix("torch.")
    rope = {"rope_type": "default", "rope_theta": args.rope_theta, **(args.rope_scaling or {})}
    architecture = family["architecture"]
    if reward_head:
        architecture = architecture.replace(CAUSAL_LM, SEQUENCE_CLASSIFICATION)
    cfg = {
        "architectures": [architecture], "model_type": args.model_type,
        "vocab_size": args.vocab_size, "hidden_size": args.dim, "intermediate_size": args.ffn_dim,
        "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim, "hidden_act": "silu",
        "max_position_embeddings": args.max_seq_len, "rms_norm_eps": args.norm_eps, "rope_parameters": rope,
        "tie_word_embeddings": args.tie_embeddings, "attention_dropout": 0.0, "initializer_range": 0.02,
        "use_cache": True, "bos_token_id": args.bos_token_id, "eos_token_id": args.eos_token_id,
        "pad_token_id": args.pad_token_id, "dtype": dtype_name,
    }
    if args.model_type in ("llama", "qwen3"):
        cfg["attention_bias"] = False
    if args.model_type == "llama":
        cfg["mlp_bias"] = False
    if args.model_type == "mistral":
        cfg["sliding_window"] = args.sliding_window
    if args.model_type in ("qwen2", "qwen3"):
        cfg["use_sliding_window"] = args.sliding_window is not None
        cfg["sliding_window"] = args.sliding_window
        cfg["max_window_layers"] = 0 if args.sliding_window is not None else args.n_layers
    if reward_head:
        cfg |= {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}  # transformers' form of num_labels=1
    return cfg

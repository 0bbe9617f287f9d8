"""Export an HF checkpoint directory (config.json + safetensors + tokenizer) to one GGUF file for llama.cpp.

    export_gguf("runs/x/final", "model.gguf", dtype="f16")       # or: optrush export runs/x/final --gguf model.gguf
    llama-cli -m model.gguf -p "Hello"                             # llama.cpp, ollama, LM Studio load it

Families: Llama 2/3 and Mistral (GGUF architecture `llama`), Qwen2 (`qwen2`, with q/k/v biases) and Qwen3
(`qwen3`, with q/k norms). Tokenizers: byte-level BPE (Llama 3, Qwen2/3, `optrush tokenizer train`) with the
GPT-2, Llama 3 or Qwen2 pre-tokenizer regex; sentencepiece tokenizers (Llama 2, Mistral v0.1-v0.3) are refused
with a pointer to llama.cpp's own converter. Matrices are written in `dtype` (f16, bf16 or f32); norms, biases
and RoPE frequency factors stay f32, as llama.cpp's converter writes them.

The `llama` architecture in llama.cpp applies RoPE to adjacent pairs (x[2i], x[2i+1]) while HF checkpoints use
the "rotate half" layout (pairs x[i], x[i + head_dim/2]), so the rows of every Q and K head are permuted on the
way out (`permute_for_ggml`); Qwen's architectures use llama.cpp's NEOX RoPE, which is rotate-half, and need none.
Attention scores are unchanged because Q and K get the same permutation.

Needs the optional `gguf` package (llama.cpp's gguf-py): `pip install gguf`.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from optrush.models.hf import args_from_hf_config
from optrush.models.io import load_model, read_config
from optrush.models.layers import rope_inv_freq
from optrush.models.llama import ModelArgs, Transformer

if TYPE_CHECKING:
    import gguf as gguf_module

# HF model_type -> GGUF architecture name
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}

_GLOBAL_NAMES = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
                 "output.weight": "output.weight"}
_BLOCK_NAMES = {
    "attention_norm.weight": "attn_norm.weight", "ffn_norm.weight": "ffn_norm.weight",
    "attention.wq.weight": "attn_q.weight", "attention.wk.weight": "attn_k.weight",
    "attention.wv.weight": "attn_v.weight", "attention.wq.bias": "attn_q.bias", "attention.wk.bias": "attn_k.bias",
    "attention.wv.bias": "attn_v.bias", "attention.wo.weight": "attn_output.weight",
    "attention.q_norm.weight": "attn_q_norm.weight", "attention.k_norm.weight": "attn_k_norm.weight",
    "feed_forward.w1.weight": "ffn_gate.weight", "feed_forward.w3.weight": "ffn_up.weight",
    "feed_forward.w2.weight": "ffn_down.weight",
}
_BLOCK = re.compile(r"layers\.(\d+)\.(.+)")

# Pre-tokenizer split regexes llama.cpp knows by name (tokenizer.ggml.pre); a plain GPT-2 ByteLevel has none.
_PRE_TOKENIZERS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+": "qwen2",
}


def export_gguf(model_dir: str | Path, out_path: str | Path, *, dtype: str = "f16") -> Path:
    """Write the model and tokenizer of HF checkpoint `model_dir` to the GGUF file `out_path`; returns its path.
    The file appears in one rename, so a failed export never leaves a truncated file behind."""
    gguf = _import_gguf()
    model_dir, out_path = Path(model_dir), Path(out_path)
    if dtype not in DTYPES:
        raise ValueError(f"GGUF dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    from optrush.peft.export import adapter_directory  # optrush.peft imports this package's model io

    if adapter_directory(model_dir) is not None:
        raise ValueError(f"{model_dir} holds a LoRA adapter, not a whole model: merge it first (optrush export "
                         f"{model_dir} --merge --out MERGED), then export MERGED with --gguf")
    cfg = read_config(model_dir)
    if cfg.get("model_type") not in ARCHITECTURES:
        raise ValueError(f"{model_dir / 'config.json'}: model_type {cfg.get('model_type')!r} has no GGUF export in "
                         f"optrush (supported: {', '.join(ARCHITECTURES)}); use llama.cpp's convert_hf_to_gguf.py")
    try:
        args = args_from_hf_config(cfg)
    except ValueError as error:  # including UnsupportedArchitecture: a feature the native model lacks
        raise ValueError(f"{model_dir / 'config.json'}: {error}; use llama.cpp's convert_hf_to_gguf.py") from None
    arch = ARCHITECTURES[args.model_type]
    if args.sliding_window is not None:
        warnings.warn(f"{model_dir}: sliding_window={args.sliding_window} is not stored in the GGUF file; "
                      f"llama.cpp's {arch} architecture attends to the whole context", stacklevel=2)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        _add_hyperparameters(writer, gguf, args, dtype=dtype, name=model_dir.name)
        _add_tokenizer(writer, gguf, model_dir, args)  # before loading the weights: a tokenizer error comes fast
        _write_tensors(writer, gguf, _tensors(load_model(model_dir), arch=arch), dtype=dtype)
        writer.close()
        os.replace(tmp, out_path)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    return out_path


def permute_for_ggml(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of a Q or K projection (n_heads * head_dim, ...) from HF's rotate-half RoPE layout to
    GGML's adjacent-pair layout: within each head, row i goes to 2i and row head_dim/2 + i to 2i + 1."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def gguf_tensor_name(name: str) -> str:
    """llama.cpp's name for optrush parameter `name` (e.g. layers.0.attention.wq.weight -> blk.0.attn_q.weight)."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    match = _BLOCK.fullmatch(name)
    if match and match.group(2) in _BLOCK_NAMES:
        return f"blk.{match.group(1)}.{_BLOCK_NAMES[match.group(2)]}"
    raise ValueError(f"parameter {name!r} has no GGUF tensor name (merge LoRA adapters before exporting)")


def _import_gguf() -> gguf_module:
    try:
        import gguf
    except ImportError:
        raise ImportError("GGUF export needs the `gguf` package (llama.cpp's gguf-py): pip install gguf") from None
    return gguf


# ------------------------------------------------------------------------------------------------------ writing

def _add_hyperparameters(writer, gguf, args: ModelArgs, *, dtype: str, name: str) -> None:
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "bf16": gguf.LlamaFileType.MOSTLY_BF16}
    writer.add_type("model")
    writer.add_name(name)
    writer.add_file_type(file_types[dtype])
    writer.add_vocab_size(args.vocab_size)
    writer.add_context_length(args.max_seq_len)
    writer.add_embedding_length(args.dim)
    writer.add_block_count(args.n_layers)
    writer.add_feed_forward_length(args.ffn_dim)
    writer.add_head_count(args.n_heads)
    writer.add_head_count_kv(args.n_kv_heads)
    writer.add_key_length(args.head_dim)  # llama.cpp assumes dim / n_heads without them (Qwen3 differs)
    writer.add_value_length(args.head_dim)
    writer.add_rope_dimension_count(args.head_dim)
    writer.add_rope_freq_base(args.rope_theta)
    writer.add_layer_norm_rms_eps(args.norm_eps)
    rope_type = (args.rope_scaling or {}).get("rope_type", "default")
    if rope_type in ("linear", "yarn"):
        writer.add_rope_scaling_type(gguf.RopeScalingType(rope_type))
        writer.add_rope_scaling_factor(float(args.rope_scaling["factor"]))
    if rope_type == "yarn":
        writer.add_rope_scaling_orig_ctx_len(int(args.rope_scaling["original_max_position_embeddings"]))


def _tensors(model: Transformer, *, arch: str) -> list[tuple[str, torch.Tensor, int | None]]:
    """(GGUF name, tensor, heads whose rows to permute or None) in file order."""
    args = model.args
    out = []
    if (args.rope_scaling or {}).get("rope_type") == "llama3":
        if arch != "llama":
            raise ValueError(f"llama3 RoPE scaling on GGUF architecture {arch!r} is not supported by llama.cpp")
        # llama.cpp divides each RoPE frequency by a per-pair factor read from this tensor
        plain, _ = rope_inv_freq(head_dim=args.head_dim, theta=args.rope_theta, scaling=None,
                                 max_seq_len=args.max_seq_len)
        scaled, _ = rope_inv_freq(head_dim=args.head_dim, theta=args.rope_theta, scaling=args.rope_scaling,
                                  max_seq_len=args.max_seq_len)
        out.append(("rope_freqs.weight", (plain / scaled).float(), None))
    heads = {"attention.wq.weight": args.n_heads, "attention.wk.weight": args.n_kv_heads} if arch == "llama" else {}
    for name, param in model.named_parameters():  # a tied output.weight is not listed, as llama.cpp expects
        out.append((gguf_tensor_name(name), param.detach(), heads.get(name.split(".", 2)[-1])))
    return out


def _write_tensors(writer, gguf, tensors: list[tuple[str, torch.Tensor, int | None]], *, dtype: str) -> None:
    """Tensor infos first, then the data one tensor at a time: peak memory is the model plus one converted
    tensor, where handing GGUFWriter every array up front would hold a second copy of the model."""
    stored = [torch.float32 if t.ndim == 1 else DTYPES[dtype] for _, t, _ in tensors]
    for (name, tensor, _), torch_dtype in zip(tensors, stored):
        # numpy has no bfloat16: bf16 tensors travel as their raw 16-bit patterns
        raw = gguf.GGMLQuantizationType.BF16 if torch_dtype == torch.bfloat16 else None
        np_dtype = np.dtype(np.int16 if raw is not None else str(torch_dtype).removeprefix("torch."))
        writer.add_tensor_info(name, tuple(tensor.shape), np_dtype, tensor.numel() * np_dtype.itemsize,
                               raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for (_, tensor, heads), torch_dtype in zip(tensors, stored):
        if heads is not None:
            tensor = permute_for_ggml(tensor, heads)
        tensor = tensor.to("cpu", torch_dtype).contiguous()
        writer.write_tensor_data((tensor.view(torch.int16) if torch_dtype == torch.bfloat16 else tensor).numpy())


# ---------------------------------------------------------------------------------------------------- tokenizer

def _add_tokenizer(writer, gguf, model_dir: Path, args: ModelArgs) -> None:
    from transformers import PreTrainedTokenizerFast

    if not (model_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{model_dir} has no tokenizer.json: GGUF export needs the (fast) tokenizer saved "
                                "beside the model (save_pretrained of the tokenizer into the checkpoint directory)")
    # the generic class reads exactly the files; AutoTokenizer would pick a model_type-specific class that may
    # add tokens of its own (transformers' Qwen2Tokenizer adds <|endoftext|>)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(spec, model_dir))
    tokens, types = _vocabulary(tokenizer, gguf, args.vocab_size, model_dir)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else args.bos_token_id
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else args.eos_token_id
    for add, token_id in ((writer.add_bos_token_id, bos), (writer.add_eos_token_id, eos),
                          (writer.add_pad_token_id, tokenizer.pad_token_id)):
        if isinstance(token_id, list):  # config.json may list several EOS ids; the first is the primary one
            token_id = token_id[0]
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(bos is not None and tokenizer("a")["input_ids"][:1] == [bos])
    if isinstance(tokenizer.chat_template, str):
        writer.add_chat_template(tokenizer.chat_template)


def _pre_tokenizer(spec: dict, model_dir: Path) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer, or a ValueError saying it is not byte-level BPE."""
    if spec["model"]["type"] != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise ValueError(f"{model_dir / 'tokenizer.json'}: only byte-level BPE tokenizers (Llama 3, Qwen, "
                         "optrush-trained) can be exported; for sentencepiece ones (Llama 2, Mistral) use "
                         "llama.cpp's convert_hf_to_gguf.py")
    pre = spec["pre_tokenizer"]
    if pre["type"] == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    patterns = [p["pattern"].get("Regex") for p in pre.get("pretokenizers", []) if p["type"] == "Split"]
    if len(patterns) == 1 and patterns[0] in _PRE_TOKENIZERS:
        return _PRE_TOKENIZERS[patterns[0]]
    raise ValueError(f"{model_dir / 'tokenizer.json'}: pre-tokenizer {json.dumps(pre)[:200]} is none that "
                     "llama.cpp knows by name (gpt-2, llama-bpe, qwen2); use llama.cpp's convert_hf_to_gguf.py")


def _vocabulary(tokenizer, gguf, vocab_size: int, model_dir: Path) -> tuple[list[str], list[int]]:
    """(token of every id below vocab_size, its llama.cpp token type); ids the tokenizer lacks (an embedding
    padded past the vocabulary) get unused placeholder tokens, as llama.cpp's converter writes them."""
    by_id = {i: token for token, i in tokenizer.backend_tokenizer.get_vocab(with_added_tokens=True).items()}
    if max(by_id) >= vocab_size:
        raise ValueError(f"{model_dir}: the tokenizer has token id {max(by_id)} but the model's vocab_size is "
                         f"{vocab_size}; resize the embedding to the tokenizer before exporting")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types

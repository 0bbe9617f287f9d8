"""GGUF export: tensors (names, shapes, dtypes, values), the Q/K RoPE permutation, metadata and tokenizer round
trip, read back with gguf.GGUFReader."""
import json
import shutil
import sys

import numpy as np
import pytest
import torch

from optrush.models import build_model, get_preset, save_model
from optrush.models.gguf import export_gguf, permute_for_ggml
from optrush.models.layers import apply_rotary, rope_inv_freq, rope_tables

gguf = pytest.importorskip("gguf")

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 256}
# from Llama 3's tokenizer.json
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
BLOCK_TENSORS = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up",
                 "ffn_down"]


def _checkpoint(tmp_path, tokenizer_dir, **overrides):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    # three ids past the tokenizer: an embedding padded beyond the vocabulary
    model = build_model(get_preset("debug", vocab_size=len(tokenizer) + 3, **overrides), seed=0)
    path = tmp_path / "model"
    shutil.copytree(tokenizer_dir, path)
    save_model(model, path)
    return model, tokenizer, path


def _read(path):
    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    return {t.name: t for t in reader.tensors}, fields


def _values(tensor) -> torch.Tensor:
    """A reader tensor as torch, in numpy (row-major) shape: GGUF lists dimensions innermost first."""
    shape = tuple(int(n) for n in reversed(tensor.shape))
    if tensor.tensor_type == gguf.GGMLQuantizationType.BF16:
        raw = np.frombuffer(tensor.data.tobytes(), dtype=np.int16).copy()
        return torch.from_numpy(raw).view(torch.bfloat16).reshape(shape)
    return torch.from_numpy(np.array(tensor.data)).reshape(shape)


def _unpermute(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    rows = weight.shape[0]
    return weight.reshape(n_heads, rows // n_heads // 2, 2, -1).transpose(1, 2).reshape(weight.shape)


def test_llama_export_tensors_metadata_and_tokenizer(tmp_path, tokenizer_dir):
    model, tokenizer, path = _checkpoint(tmp_path, tokenizer_dir, rope_scaling=LLAMA3_ROPE)
    args = model.args
    out = export_gguf(path, tmp_path / "m.gguf", dtype="f16")
    tensors, fields = _read(out)

    expected = {"token_embd.weight", "output_norm.weight", "output.weight", "rope_freqs.weight"} | {
        f"blk.{i}.{name}.weight" for i in range(args.n_layers) for name in BLOCK_TENSORS}
    assert set(tensors) == expected
    from optrush.models.gguf import gguf_tensor_name

    for name, param in model.named_parameters():
        tensor = tensors[gguf_tensor_name(name)]
        assert [int(n) for n in reversed(tensor.shape)] == list(param.shape), name
        want_type = gguf.GGMLQuantizationType.F32 if param.ndim == 1 else gguf.GGMLQuantizationType.F16
        assert tensor.tensor_type == want_type, name
        values = _values(tensor)
        if name.endswith("attention.wq.weight"):
            values = _unpermute(values, args.n_heads)
        elif name.endswith("attention.wk.weight"):
            values = _unpermute(values, args.n_kv_heads)
        assert torch.equal(values, param.detach().to(values.dtype)), name
    # q really was permuted (the check above would also pass with no permutation if _unpermute were identity)
    assert not torch.equal(_values(tensors["blk.0.attn_q.weight"]), model.layers[0].attention.wq.weight.half())

    # llama3 scaling: per-frequency divisors, 1 for high frequencies and `factor` for the lowest
    plain, _ = rope_inv_freq(head_dim=args.head_dim, theta=args.rope_theta, scaling=None, max_seq_len=4096)
    factors = _values(tensors["rope_freqs.weight"])
    assert factors.shape == (args.head_dim // 2,) and factors[0] == 1.0 and factors[-1] == 8.0
    scaled, _ = rope_inv_freq(head_dim=args.head_dim, theta=args.rope_theta, scaling=LLAMA3_ROPE, max_seq_len=4096)
    torch.testing.assert_close(plain / factors, scaled)

    assert fields["general.architecture"] == "llama"
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    assert fields["llama.context_length"] == args.max_seq_len
    assert fields["llama.embedding_length"] == args.dim
    assert fields["llama.block_count"] == args.n_layers
    assert fields["llama.feed_forward_length"] == args.ffn_dim
    assert fields["llama.attention.head_count"] == args.n_heads
    assert fields["llama.attention.head_count_kv"] == args.n_kv_heads
    assert fields["llama.rope.dimension_count"] == args.head_dim
    assert fields["llama.attention.key_length"] == fields["llama.attention.value_length"] == args.head_dim
    assert fields["llama.rope.freq_base"] == pytest.approx(args.rope_theta)
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(args.norm_eps)
    assert fields["llama.vocab_size"] == args.vocab_size

    n = len(tokenizer)
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    tokens = fields["tokenizer.ggml.tokens"]
    assert tokens[:n] == tokenizer.convert_ids_to_tokens(list(range(n)))
    assert tokens[n:] == [f"[PAD{i}]" for i in range(n, n + 3)]
    types = fields["tokenizer.ggml.token_type"]
    assert types[tokenizer.eos_token_id] == gguf.TokenType.CONTROL
    assert types[tokenizer.convert_tokens_to_ids("a")] == gguf.TokenType.NORMAL
    assert types[n:] == [gguf.TokenType.UNUSED] * 3
    merges = json.loads((tokenizer_dir / "tokenizer.json").read_text())["model"]["merges"]
    assert fields["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in merges]
    assert fields["tokenizer.ggml.bos_token_id"] == tokenizer.bos_token_id
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert fields["tokenizer.ggml.padding_token_id"] == tokenizer.pad_token_id
    assert fields["tokenizer.ggml.add_bos_token"] is True
    assert fields["tokenizer.chat_template"] == tokenizer.chat_template


@pytest.mark.parametrize("family", [{}, {"model_type": "qwen2", "qkv_bias": True, "tie_embeddings": True}],
                         ids=["llama", "qwen2"])
def test_transformers_gguf_loader_gives_the_same_logits(family, tmp_path, tokenizer_dir):
    """An independent reader: transformers' GGUF loader undoes llama.cpp's layout with its own code."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer, path = _checkpoint(tmp_path, tokenizer_dir, **family)
    export_gguf(path, path / "m.gguf", dtype="f32")
    loaded = AutoModelForCausalLM.from_pretrained(path, gguf_file="m.gguf", dtype=torch.float32)
    ids = torch.tensor([tokenizer("Whisk the eggs, then add the flour.")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids), rtol=1e-5, atol=1e-5)
    read_back = AutoTokenizer.from_pretrained(path, gguf_file="m.gguf")
    assert read_back("Whisk the eggs.")["input_ids"] == tokenizer("Whisk the eggs.")["input_ids"]


def _interleaved_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """GGML's normal RoPE: rotate adjacent pairs (x[2i], x[2i+1]) by angle i. x: (T, heads, head_dim)."""
    even, odd = x[..., 0::2], x[..., 1::2]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.stack((even * c - odd * s, odd * c + even * s), dim=-1).flatten(-2)


def test_permutation_maps_rotate_half_rope_to_interleaved_rope():
    torch.manual_seed(0)
    n_heads, n_kv, head_dim, dim, seq = 4, 2, 8, 12, 6
    wq, wk = torch.randn(n_heads * head_dim, dim), torch.randn(n_kv * head_dim, dim)
    x = torch.randn(seq, dim)
    inv_freq, factor = rope_inv_freq(head_dim=head_dim, theta=100.0, scaling=None, max_seq_len=seq)
    cos, sin = rope_tables(inv_freq, factor, seq_len=seq)

    q, k = (x @ wq.T).view(1, seq, n_heads, head_dim), (x @ wk.T).view(1, seq, n_kv, head_dim)
    q_half, k_half = (t[0] for t in apply_rotary(q, k, cos[None], sin[None]))
    q_gg = _interleaved_rope((x @ permute_for_ggml(wq, n_heads).T).view(seq, n_heads, head_dim), cos, sin)
    k_gg = _interleaved_rope((x @ permute_for_ggml(wk, n_kv).T).view(seq, n_kv, head_dim), cos, sin)

    # the interleaved result is the rotate-half result with each head's dimensions reordered the same way ...
    def reorder(t):
        return t.reshape(seq, -1, 2, head_dim // 2).transpose(-1, -2).reshape(t.shape)

    torch.testing.assert_close(q_gg, reorder(q_half))
    torch.testing.assert_close(k_gg, reorder(k_half))
    # ... so attention scores (q of head h against k of its group) are identical
    group = n_heads // n_kv
    scores_hf = torch.einsum("thd,shd->hts", q_half, k_half.repeat_interleave(group, dim=1))
    scores_gg = torch.einsum("thd,shd->hts", q_gg, k_gg.repeat_interleave(group, dim=1))
    torch.testing.assert_close(scores_gg, scores_hf)


def test_qwen2_tied_bf16_keeps_biases_and_rotate_half_layout(tmp_path, tokenizer_dir):
    model, _, path = _checkpoint(tmp_path, tokenizer_dir, model_type="qwen2", qkv_bias=True, tie_embeddings=True)
    tensors, fields = _read(export_gguf(path, tmp_path / "q.gguf", dtype="bf16"))
    assert fields["general.architecture"] == "qwen2" and "qwen2.context_length" in fields
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_BF16
    assert "output.weight" not in tensors and "rope_freqs.weight" not in tensors  # tied: llama.cpp reuses token_embd
    assert {f"blk.1.attn_{x}.bias" for x in "qkv"} <= set(tensors)
    q = tensors["blk.0.attn_q.weight"]
    assert q.tensor_type == gguf.GGMLQuantizationType.BF16
    assert torch.equal(_values(q), model.layers[0].attention.wq.weight.detach().bfloat16())  # NEOX RoPE: no permute
    bias = tensors["blk.0.attn_k.bias"]
    assert bias.tensor_type == gguf.GGMLQuantizationType.F32
    assert torch.equal(_values(bias), model.layers[0].attention.wk.bias.detach())


def test_qwen3_exports_q_k_norms_and_head_dim(tmp_path, tokenizer_dir):
    # not through transformers' GGUF loader: it ignores qwen3.attention.key_length (llama.cpp reads it)
    model, _, path = _checkpoint(tmp_path, tokenizer_dir, model_type="qwen3", qk_norm=True, head_dim=32)
    tensors, fields = _read(export_gguf(path, tmp_path / "q3.gguf"))
    assert fields["general.architecture"] == "qwen3" and fields["qwen3.attention.key_length"] == 32
    norm = tensors["blk.1.attn_k_norm.weight"]
    assert norm.tensor_type == gguf.GGMLQuantizationType.F32
    assert torch.equal(_values(norm), model.layers[1].attention.k_norm.weight.detach())
    assert [int(n) for n in tensors["blk.0.attn_q.weight"].shape] == [64, 4 * 32]


def test_cli_export_gguf_and_clear_errors(tmp_path, tokenizer_dir, monkeypatch):
    from optrush.cli.main import main

    _, _, path = _checkpoint(tmp_path, tokenizer_dir)
    assert main(["export", str(path), "--gguf", str(tmp_path / "cli.gguf"), "--gguf-dtype", "f32"]) == 0
    tensors, fields = _read(tmp_path / "cli.gguf")
    assert fields["general.file_type"] == gguf.LlamaFileType.ALL_F32
    assert tensors["blk.0.ffn_up.weight"].tensor_type == gguf.GGMLQuantizationType.F32

    with pytest.raises(ValueError, match="bf32.*f32, f16, bf16"):
        export_gguf(path, tmp_path / "x.gguf", dtype="bf32")
    other = tmp_path / "gemma"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "gemma2"}))
    with pytest.raises(ValueError, match="gemma2.*supported: llama, mistral, qwen2, qwen3"):
        export_gguf(other, tmp_path / "x.gguf")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="LoRA adapter.*--merge --out MERGED"):
        export_gguf(adapter, tmp_path / "x.gguf")
    config = json.loads((path / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "attention_bias": True}))
    with pytest.raises(ValueError, match="config.json.*attention_bias"):
        export_gguf(other, tmp_path / "x.gguf")
    # Llama 3's split regex is known to llama.cpp as llama-bpe; another regex is refused
    spec = json.loads((path / "tokenizer.json").read_text())
    split = {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False}
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [split, {
        "type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    (path / "tokenizer.json").write_text(json.dumps(spec))
    assert _read(export_gguf(path, tmp_path / "l3.gguf"))[1]["tokenizer.ggml.pre"] == "llama-bpe"
    split["pattern"]["Regex"] = r"\s+"
    (path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="tokenizer.json: pre-tokenizer .* llama.cpp knows"):
        export_gguf(path, tmp_path / "x.gguf")
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(ImportError, match="pip install gguf"):
        export_gguf(path, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()

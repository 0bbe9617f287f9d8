"""HF parity: tiny random transformers models of every supported family load into the native model with equal
fp32 logits, and the native model saves back into something transformers loads with equal logits. Also the RoPE
tables against transformers' own functions, sharded checkpoints, and the transformers fallback."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from optrush.models import load_model, save_model  # noqa: E402
from optrush.models.hf_wrapper import HFCausalLM  # noqa: E402
from optrush.models.layers import rope_inv_freq  # noqa: E402
from optrush.models.llama import Transformer  # noqa: E402

ATOL = 1e-5
VOCAB, MAX_POS, T = 256, 128, 24
BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=VOCAB, max_position_embeddings=MAX_POS)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}
FAMILIES = {
    "llama-llama3-rope": lambda: transformers.LlamaConfig(**BASE, rope_scaling=LLAMA3),
    "llama-linear-rope": lambda: transformers.LlamaConfig(**BASE, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "llama-yarn-rope": lambda: transformers.LlamaConfig(
        **BASE, rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}),
    "qwen2-qkv-bias": lambda: transformers.Qwen2Config(**BASE),
    "qwen3-qk-norm-head-dim": lambda: transformers.Qwen3Config(**BASE, head_dim=32),  # 4 * 32 != 64
    "mistral-sliding-window": lambda: transformers.MistralConfig(**BASE, sliding_window=8),  # 8 < T: it matters
    "llama-tied": lambda: transformers.LlamaConfig(**BASE, tie_word_embeddings=True),
}


def random_hf_model(config, seed: int = 0):
    """A transformers model with weights large enough that every term shows in the logits (the default
    std-0.02 init gives near-zero logits, which would make a loose comparison pass)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(1.0 if "norm" in name else 0.0, 0.1)
    return model.eval()


def hf_logits(model, ids, position_ids=None):
    with torch.no_grad():
        return model(input_ids=ids, position_ids=position_ids).logits


def native_logits(model, ids, position_ids=None):
    with torch.no_grad():
        return model(ids, position_ids=position_ids)


def inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, T), generator=g)
    # consecutive positions with a large offset in row 1 (a restart would make transformers infer packing)
    positions = torch.stack([torch.arange(T), torch.arange(T) + MAX_POS - T - 3])
    return ids, positions


@pytest.mark.parametrize("family", list(FAMILIES))
def test_load_and_save_round_trip_matches_transformers(family, tmp_path):
    hf = random_hf_model(FAMILIES[family]())
    hf.save_pretrained(tmp_path / "hf")
    model = load_model(tmp_path / "hf")
    assert isinstance(model, Transformer)
    ids, positions = inputs()
    for pos in (None, positions):
        expected = hf_logits(hf, ids, pos)
        torch.testing.assert_close(native_logits(model, ids, pos), expected, atol=ATOL, rtol=0)

    save_model(model, tmp_path / "ours")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="sdpa")
    assert type(reloaded) is type(hf)
    torch.testing.assert_close(hf_logits(reloaded, ids, positions), hf_logits(hf, ids, positions), atol=ATOL, rtol=0)


def test_sliding_window_is_really_exercised(tmp_path):
    """Guard for the Mistral case above: without the window the logits differ, so the parity means something."""
    hf = random_hf_model(FAMILIES["mistral-sliding-window"]())
    hf.save_pretrained(tmp_path)
    model = load_model(tmp_path)
    ids, _ = inputs()
    model.args.sliding_window = None
    assert (native_logits(model, ids) - hf_logits(hf, ids)).abs().max() > 1e-3


@pytest.mark.parametrize("scaling", [
    None,
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096},
    {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "mscale": 1.0,
     "mscale_all_dim": 0.707, "beta_fast": 16, "beta_slow": 2},
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 2048, "attention_factor": 0.9,
     "truncate": False},
])
def test_rope_frequencies_match_transformers(scaling):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    theta, head_dim, max_pos = 500000.0, 128, 16384
    config = transformers.LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
                                      max_position_embeddings=max_pos, rope_theta=theta,
                                      rope_scaling=dict(scaling) if scaling else None)
    inv_freq, factor = rope_inv_freq(head_dim=head_dim, theta=theta, scaling=scaling, max_seq_len=max_pos)
    if scaling is None:
        expected = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)), 1.0
    else:
        expected = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](config, "cpu")
    torch.testing.assert_close(inv_freq, expected[0], atol=0, rtol=0)
    assert factor == pytest.approx(expected[1], abs=1e-12)


def test_dynamic_rope_is_rejected_clearly():
    with pytest.raises(ValueError, match="dynamic"):
        rope_inv_freq(head_dim=16, theta=1e4, scaling={"rope_type": "dynamic", "factor": 2.0}, max_seq_len=64)


def test_sharded_checkpoints_load_and_save(tmp_path):
    hf = random_hf_model(FAMILIES["qwen2-qkv-bias"]())
    hf.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    model = load_model(tmp_path / "hf")
    ids, positions = inputs()
    torch.testing.assert_close(native_logits(model, ids, positions), hf_logits(hf, ids, positions), atol=ATOL, rtol=0)

    save_model(model, tmp_path / "ours", max_shard_bytes=40_000)
    shards = sorted(p.name for p in (tmp_path / "ours").glob("*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "ours" / "model.safetensors.index.json").is_file()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="sdpa")
    torch.testing.assert_close(hf_logits(reloaded, ids), hf_logits(hf, ids), atol=ATOL, rtol=0)
    torch.testing.assert_close(native_logits(load_model(tmp_path / "ours"), ids), hf_logits(hf, ids), atol=ATOL, rtol=0)


def test_tied_checkpoint_that_also_stores_lm_head_loads(tmp_path):
    from safetensors.torch import load_file, save_file

    hf = random_hf_model(FAMILIES["llama-tied"]())
    hf.save_pretrained(tmp_path)
    tensors = {k: v.clone() for k, v in load_file(tmp_path / "model.safetensors").items()}  # unmap before rewriting
    assert "lm_head.weight" not in tensors
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model = load_model(tmp_path)
    assert model.output.weight is model.tok_embeddings.weight
    ids, _ = inputs()
    torch.testing.assert_close(native_logits(model, ids), hf_logits(hf, ids), atol=ATOL, rtol=0)


def test_bfloat16_load(tmp_path):
    hf = random_hf_model(FAMILIES["llama-llama3-rope"]())
    hf.save_pretrained(tmp_path)
    model = load_model(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.rope_cos.dtype == torch.float32  # RoPE tables stay fp32
    ids, _ = inputs()
    logits = native_logits(model, ids)
    assert logits.dtype == torch.bfloat16
    # bf16 weights and activations: close to fp32, not equal
    assert (logits.float() - hf_logits(hf, ids)).abs().max() < 0.25


def test_checkpoint_dtype_is_the_default(tmp_path):
    hf = random_hf_model(FAMILIES["qwen3-qk-norm-head-dim"]()).to(torch.bfloat16)
    hf.save_pretrained(tmp_path)
    model = load_model(tmp_path)
    assert model.tok_embeddings.weight.dtype == torch.bfloat16
    save_model(model, tmp_path / "again")
    assert transformers.AutoConfig.from_pretrained(tmp_path / "again").dtype == torch.bfloat16


def test_unsupported_architecture_falls_back_to_transformers(tmp_path):
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=VOCAB, n_positions=64)
    hf = random_hf_model(config)
    hf.save_pretrained(tmp_path / "gpt2")
    with pytest.warns(UserWarning, match="(?s)gpt2.*packed attention.*fused"):
        model = load_model(tmp_path / "gpt2")
    assert isinstance(model, HFCausalLM) and model.vocab_size == VOCAB
    ids, _ = inputs()
    torch.testing.assert_close(native_logits(model, ids), hf_logits(hf, ids), atol=ATOL, rtol=0)
    labels = torch.where(ids > 100, ids, -100)
    loss_sum = model(ids, labels=labels, reduction="sum")
    loss_mean = model(ids, labels=labels, reduction="mean")
    torch.testing.assert_close(loss_sum / (labels != -100).sum(), loss_mean)
    with pytest.raises(ValueError, match="packing=none"):
        model(ids, document_ids=torch.zeros_like(ids))
    assert model.num_params() > model.num_params(exclude_embeddings=True) > 0 and model.flops_per_token(T) > 0

    save_model(model, tmp_path / "saved")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    torch.testing.assert_close(hf_logits(reloaded, ids), hf_logits(hf, ids), atol=ATOL, rtol=0)


def test_unknown_model_type_names_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "no-such-arch", "hidden_size": 8}')
    with pytest.raises(ValueError, match="(?s)no-such-arch.*llama, mistral, qwen2, qwen3.*transformers"):
        load_model(tmp_path)


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("family", ["llama-llama3-rope", "qwen3-qk-norm-head-dim", "mistral-sliding-window"])
def test_cuda_bf16_is_as_accurate_as_transformers(family, tmp_path):
    """On the GPU kernels (flash for causal, memory-efficient for masks) in bf16, the native model is no further
    from the fp32 reference than transformers' own bf16 forward is; fp32 on the GPU matches closely."""
    reference = random_hf_model(FAMILIES[family]())
    reference.save_pretrained(tmp_path)
    ids, positions = inputs()
    expected = hf_logits(reference, ids, positions)
    hf_bf16 = reference.to("cuda", torch.bfloat16)
    hf_error = (hf_logits(hf_bf16, ids.cuda(), positions.cuda()).float().cpu() - expected).abs().max()
    ours = load_model(tmp_path, dtype=torch.bfloat16, device="cuda")
    our_error = (native_logits(ours, ids.cuda(), positions.cuda()).float().cpu() - expected).abs().max()
    assert our_error <= 1.5 * hf_error + 1e-2, (our_error, hf_error)
    fp32 = load_model(tmp_path, dtype=torch.float32, device="cuda")
    torch.testing.assert_close(native_logits(fp32, ids.cuda(), positions.cuda()).cpu(), expected, atol=1e-4, rtol=0)


@pytest.mark.gpu
@requires_cuda
def test_cuda_bf16_packed_matches_unpacked_and_trains():
    from optrush.models import build_model, get_preset

    model = build_model(get_preset("debug", sliding_window=None), dtype=torch.bfloat16, device="cuda", seed=0)
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, 512, (n,), generator=g) for n in (37, 50)]
    ids = torch.cat([*docs, torch.zeros(9, dtype=torch.long)])[None].cuda()
    positions = torch.cat([torch.arange(37), torch.arange(50), torch.arange(9)])[None].cuda()
    documents = torch.tensor([0] * 37 + [1] * 50 + [-1] * 9)[None].cuda()
    with torch.no_grad():
        packed = model(ids, position_ids=positions, document_ids=documents).float()
        alone = [model(d[None].cuda()).float() for d in docs]
    torch.testing.assert_close(packed[:, :37], alone[0], atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(packed[:, 37:87], alone[1], atol=3e-2, rtol=3e-2)
    labels = torch.where(documents >= 0, ids.roll(-1, dims=1), -100)
    model(ids, position_ids=positions, document_ids=documents, labels=labels, reduction="sum").backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())

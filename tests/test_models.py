"""The native model on its own: packed == unpacked, loss reductions, init and meta-device materialisation,
presets, HF key/config translation, and load/save error messages (no transformers needed)."""
import json

import pytest
import torch
import torch.nn.functional as F

from optrush.models import PRESETS, ModelArgs, Transformer, build_model, get_preset, load_model, save_model
from optrush.models.hf import UnsupportedArchitecture, args_from_hf_config, from_hf_key, hf_config_from_args, \
    to_hf_key, to_hf_state_dict
from optrush.models.io import load_state_into
from optrush.models.layers import attention_mask, linear_cross_entropy


def debug_model(seed: int = 0, **overrides) -> Transformer:
    return build_model(get_preset("debug", **overrides), dtype=torch.float32, device="cpu", seed=seed)


# ------------------------------------------------------------------------------------------------- packing

@pytest.mark.parametrize("overrides", [{}, {"sliding_window": 4}, {"qk_norm": True, "qkv_bias": True}])
def test_packed_forward_equals_each_document_alone(overrides):
    model = debug_model(**overrides).eval()
    g = torch.Generator().manual_seed(0)
    doc_a, doc_b = torch.randint(0, 512, (5,), generator=g), torch.randint(0, 512, (7,), generator=g)
    pad = torch.zeros(4, dtype=torch.long)
    ids = torch.cat([doc_a, doc_b, pad])[None]
    positions = torch.cat([torch.arange(5), torch.arange(7), torch.arange(4)])[None]
    documents = torch.tensor([0] * 5 + [1] * 7 + [-1] * 4)[None]
    with torch.no_grad():
        packed = model(ids, position_ids=positions, document_ids=documents)
        alone_a, alone_b = model(doc_a[None]), model(doc_b[None])
    torch.testing.assert_close(packed[:, :5], alone_a, atol=1e-5, rtol=0)
    torch.testing.assert_close(packed[:, 5:12], alone_b, atol=1e-5, rtol=0)
    assert torch.isfinite(packed).all()  # padding rows attend to earlier padding: no NaN


def test_packed_gradients_are_finite_and_isolated():
    model = debug_model()
    ids = torch.randint(0, 512, (2, 12))
    documents = torch.tensor([[0] * 6 + [1] * 6, [0] * 9 + [-1] * 3])
    positions = torch.tensor([list(range(6)) * 2, list(range(9)) + [0, 1, 2]])
    labels = torch.where(documents >= 0, torch.randint(0, 512, (2, 12)), -100)
    model(ids, position_ids=positions, document_ids=documents, labels=labels, reduction="sum").backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_attention_mask_shapes_and_rules():
    assert attention_mask(None, seq_len=16) is None
    assert attention_mask(None, seq_len=16, sliding_window=16) is None
    window = attention_mask(None, seq_len=6, sliding_window=2)[0, 0]
    assert window.tolist()[5] == [False, False, False, False, True, True]
    docs = torch.tensor([[0, 0, 1, -1, -1]])
    mask = attention_mask(docs, seq_len=5)[0, 0]
    assert mask.tolist() == [[True, False, False, False, False], [True, True, False, False, False],
                             [False, False, True, False, False], [False, False, False, True, False],
                             [False, False, False, True, True]]


# ---------------------------------------------------------------------------------------------------- loss

def test_loss_reductions_match_cross_entropy():
    model = debug_model()
    ids = torch.randint(0, 512, (2, 10))
    labels = torch.randint(0, 512, (2, 10))
    labels[0, :4] = -100
    logits = model(ids)
    reference = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none")
    loss_sum = model(ids, labels=labels, reduction="sum")
    loss_mean = model(ids, labels=labels)
    torch.testing.assert_close(loss_sum, reference.sum())
    torch.testing.assert_close(loss_mean, reference.sum() / 16)
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(torch.zeros(1, 4), torch.zeros(3, 4), torch.zeros(1, dtype=torch.long), reduction="x")


def test_loss_fn_is_swappable():
    model = debug_model()
    calls = []

    def spy(hidden, weight, labels, *, reduction):
        calls.append((hidden.shape, weight is model.output.weight, reduction))
        return hidden.sum()

    model.loss_fn = spy
    ids = torch.randint(0, 512, (1, 8))
    model(ids, labels=ids, reduction="sum")
    assert calls == [(torch.Size([1, 8, 64]), True, "sum")]


# ------------------------------------------------------------------------------------------ init and sizes

def test_build_model_is_seeded_fully_initialised_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a, b, c = debug_model(seed=1), debug_model(seed=1), debug_model(seed=2)
    assert torch.rand(1) == before
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb) and torch.isfinite(pa).all()
        if not name.endswith("norm.weight"):
            assert not torch.equal(pa, pc) and (pa != 0).all(), name  # random, and no zero-initialised tensor


def test_meta_materialisation_keeps_tying_and_rope_fp32():
    model = build_model(get_preset("demo"), dtype=torch.bfloat16, device="cpu", seed=0)
    assert model.output.weight is model.tok_embeddings.weight
    assert model.rope_cos.dtype == torch.float32 and model.rope_cos.shape == (4096, 32)
    assert model.tok_embeddings.weight.dtype == torch.bfloat16
    assert "rope_cos" not in model.state_dict()  # non-persistent
    assert torch.isfinite(model(torch.randint(0, 2048, (1, 8)))).all()


def test_sizes_and_flops():
    model = debug_model()
    a = model.args
    embed = a.vocab_size * a.dim
    assert model.num_params() - model.num_params(exclude_embeddings=True) == embed
    assert model.flops_per_token(128) == 6 * model.num_params() + 6 * a.n_layers * 128 * a.dim
    demo = build_model(get_preset("demo"), device="cpu")
    assert 3e6 < demo.num_params() < 4e6
    assert isinstance(model.layers[0], torch.nn.Module) and len(model.layers) == a.n_layers


def test_too_long_sequence_is_a_clear_error():
    model = debug_model(max_seq_len=16)
    with pytest.raises(ValueError, match="max_seq_len=16"):
        model(torch.zeros(1, 17, dtype=torch.long))


# -------------------------------------------------------------------------------------------------- presets

def test_presets():
    assert {"debug", "demo", "llama3.2-1b", "llama3.2-3b", "llama3.1-8b", "llama3.1-70b", "qwen2.5-0.5b",
            "qwen3-0.6b", "mistral-7b-v0.3"} <= set(PRESETS)
    for args in PRESETS.values():
        hf_config_from_args(args)  # every preset is a valid HF family
    assert get_preset("debug", vocab_size=1000).vocab_size == 1000
    assert get_preset("debug", dim=128).head_dim == 32  # re-derived
    assert get_preset("qwen3-0.6b", dim=2048).head_dim == 128  # set independently: kept
    with torch.device("meta"):
        assert 1.23e9 < Transformer(get_preset("llama3.2-1b")).num_params() < 1.24e9
    with pytest.raises(ValueError, match="Did you mean 'llama3.1-8b'"):
        get_preset("llama3.1-8")
    with pytest.raises(TypeError, match="hidden"):
        get_preset("debug", hidden=3)


def test_model_args_validation():
    with pytest.raises(ValueError, match="multiple"):
        ModelArgs(vocab_size=8, dim=8, n_layers=1, n_heads=4, n_kv_heads=3, ffn_dim=8)


# ------------------------------------------------------------------------------------------------ HF mapping

def test_key_maps_round_trip():
    model = debug_model(qkv_bias=True, qk_norm=True)
    hf = to_hf_state_dict(model.state_dict())
    assert "model.layers.1.self_attn.q_proj.bias" in hf and "model.layers.0.self_attn.k_norm.weight" in hf
    assert "lm_head.weight" in hf and "model.layers.0.mlp.gate_proj.weight" in hf
    assert all(to_hf_key(from_hf_key(k)) == k for k in hf)
    assert from_hf_key("model.layers.12.post_attention_layernorm.weight") == "layers.12.ffn_norm.weight"
    assert from_hf_key("model.vision_tower.weight") is None


def test_config_translation_round_trip():
    for name in ("llama3.1-8b", "qwen2.5-0.5b", "qwen3-0.6b", "mistral-7b-v0.3"):
        args = get_preset(name)
        assert args_from_hf_config(hf_config_from_args(args)) == args


def test_legacy_config_style_is_read():
    legacy = {"model_type": "llama", "vocab_size": 8, "hidden_size": 8, "num_hidden_layers": 1,
              "num_attention_heads": 2, "intermediate_size": 16, "rope_theta": 500000.0,
              "rope_scaling": {"type": "linear", "factor": 2.0}, "torch_dtype": "bfloat16"}
    args = args_from_hf_config(legacy)
    assert args.rope_theta == 500000.0 and args.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert args.n_kv_heads == 2 and args.head_dim == 4


def test_unsupported_configs_say_why():
    with pytest.raises(UnsupportedArchitecture, match="'gpt2'.*llama, mistral, qwen2, qwen3"):
        args_from_hf_config({"model_type": "gpt2"})
    base = {"model_type": "llama", "vocab_size": 8, "hidden_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 16}
    with pytest.raises(UnsupportedArchitecture, match="attention_bias"):
        args_from_hf_config({**base, "attention_bias": True})
    with pytest.raises(UnsupportedArchitecture, match="longrope"):
        args_from_hf_config({**base, "rope_scaling": {"rope_type": "longrope"}})
    with pytest.raises(ValueError, match="intermediate_size"):
        args_from_hf_config({k: v for k, v in base.items() if k != "intermediate_size"})
    with pytest.raises(ValueError, match="qkv_bias=True.*'llama'"):
        hf_config_from_args(get_preset("debug", qkv_bias=True))


# --------------------------------------------------------------------------------------------------- load/save

def test_save_load_round_trip_and_load_state_into(tmp_path):
    model = debug_model(seed=3)
    save_model(model, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "float32"
    loaded = load_model(tmp_path / "m")
    ids = torch.randint(0, 512, (2, 9))
    torch.testing.assert_close(loaded(ids), model(ids), atol=0, rtol=0)
    (tmp_path / "m" / "model.safetensors").write_bytes(b"")  # loaded weights must not alias the file's mmap
    torch.testing.assert_close(loaded(ids), model(ids), atol=0, rtol=0)
    save_model(model, tmp_path / "m")

    live = debug_model(seed=4)
    params_before = list(live.parameters())
    load_state_into(live, tmp_path / "m")
    assert all(a is b for a, b in zip(params_before, live.parameters()))  # in place: optimizer refs stay valid
    torch.testing.assert_close(live(ids), model(ids), atol=0, rtol=0)


def test_save_into_existing_directory_keeps_other_files_and_drops_stale_shards(tmp_path):
    target = tmp_path / "final"
    save_model(debug_model(), target, max_shard_bytes=50_000)
    assert (target / "model.safetensors.index.json").is_file()
    (target / "tokenizer.json").write_text("{}")
    save_model(debug_model(seed=5), target)
    names = sorted(p.name for p in target.iterdir())
    assert names == ["config.json", "model.safetensors", "tokenizer.json"]
    assert not list(tmp_path.glob(".final.tmp-*"))
    torch.testing.assert_close(load_model(target).tok_embeddings.weight, debug_model(seed=5).tok_embeddings.weight)


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama",\n "vocab_size": }')
    with pytest.raises(ValueError, match=r"config\.json: invalid JSON at line 2"):
        load_model(tmp_path)

    save_model(debug_model(), tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "no_weights").mkdir()
    (tmp_path / "no_weights" / "config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="neither model.safetensors"):
        load_model(tmp_path / "no_weights")
    del config["num_hidden_layers"]
    (tmp_path / "no_weights" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config\.json: the llama config has no 'num_hidden_layers'"):
        load_model(tmp_path / "no_weights")


def test_truncated_and_incomplete_checkpoints(tmp_path):
    from safetensors.torch import load_file, save_file

    save_model(debug_model(), tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    tensors = {k: v.clone() for k, v in load_file(weights).items()}  # clone: load_file maps the file
    data = weights.read_bytes()

    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors: not a readable safetensors file"):
        load_model(tmp_path / "m")

    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, weights)
    with pytest.raises(ValueError, match=r"lacks 1 tensor.*model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(tmp_path / "m")

    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(192, 64)
    tensors["model.layers.7.extra.weight"] = torch.zeros(1)
    save_file(tensors, weights)
    with pytest.raises(ValueError, match=r"model\.safetensors: unexpected tensor 'model\.layers\.7\.extra\.weight'"):
        load_model(tmp_path / "m")

    del tensors["model.layers.7.extra.weight"]
    tensors["model.norm.weight"] = torch.ones(65)
    save_file(tensors, weights)
    with pytest.raises(ValueError, match=r"'model\.norm\.weight' has shape \(65,\).*\(64,\)"):
        load_model(tmp_path / "m")

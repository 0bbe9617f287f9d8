"""Attention backends (optrush.kernels.attention) against the SDPA reference on packed batches.

On CPU: FlexAttention runs forward only (it has no CPU backward), and `varlen_attn` (CUDA only) is replaced by a
per-segment SDPA stand-in with the same signature, which checks everything optrush does around the kernel
(segments from document ids, flattening, GQA, the window convention) in values and gradients. The GPU tests run
the real kernels in bf16, with gradients, eager and compiled.
"""
import pytest
import torch
import torch.nn.functional as F

from optrush.config import ConfigError, load_config
from optrush.config.schema import Config, ModelConfig
from optrush.kernels import apply_kernels
from optrush.kernels.attention import FLEX, VARLEN, varlen_mask
from optrush.models import layers
from optrush.models.llama import ModelArgs, Transformer

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def tiny_model(*, device="cpu", dtype=torch.float32, **overrides) -> Transformer:
    args = dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=512)
    torch.manual_seed(0)
    model = Transformer(ModelArgs(**{**args, **overrides}))
    model.init_weights()
    return model.to(device=device, dtype=dtype)


def packed_batch(rows: list[list[int]], *, seq_len: int, vocab: int = 64, device="cpu"):
    """(input_ids, position_ids, document_ids) for rows of documents with these lengths, padded with id -1."""
    torch.manual_seed(1)
    docs = torch.full((len(rows), seq_len), -1, dtype=torch.int32)
    positions = torch.zeros(len(rows), seq_len, dtype=torch.long)
    for r, lengths in enumerate(rows):
        start = 0
        for d, n in enumerate(lengths):
            docs[r, start:start + n] = d
            positions[r, start:start + n] = torch.arange(n)
            start += n
        positions[r, start:] = torch.arange(seq_len - start)
    ids = torch.randint(0, vocab, (len(rows), seq_len))
    return ids.to(device), positions.to(device), docs.to(device)


def stand_in_varlen_attn(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, *, window_size=(-1, -1), enable_gqa=False):
    """CPU reference with varlen_attn's signature: SDPA per segment, flash's (left, right) window convention, fewer
    KV heads than query heads shared among them (grouped-query attention), as the flash kernel takes them."""
    left, right = window_size
    out = []
    for start, end in zip(cu_seq_q[:-1].tolist(), cu_seq_q[1:].tolist()):
        i = torch.arange(end - start)
        distance = i[:, None] - i[None, :]  # query minus key: a key `left` back to `right` ahead is seen
        allowed = torch.ones_like(distance, dtype=torch.bool)
        if left >= 0:
            allowed &= distance <= left
        if right >= 0:
            allowed &= distance >= -right
        seg = [x[start:end].transpose(0, 1) for x in (q, k, v)]
        out.append(F.scaled_dot_product_attention(*seg, attn_mask=allowed, enable_gqa=enable_gqa).transpose(0, 1))
    return torch.cat(out)


@pytest.fixture
def cpu_varlen(monkeypatch):
    monkeypatch.setattr("torch.nn.attention.varlen.varlen_attn", stand_in_varlen_attn)


ROWS = [[50, 60], [100, 30]]  # row 0 ends in 20 padding tokens; T=130 is not a multiple of FlexAttention's 128
VARIANTS = [{}, {"sliding_window": 16, "qk_norm": True}]


def test_varlen_segments_follow_rows_documents_and_padding():
    docs = torch.tensor([[0, 0, 1, 1, 1, -1], [0, 0, 0, 0, 1, 1]])  # row 1 starts with doc 0 right after padding
    mask = varlen_mask(docs, seq_len=6)
    # max_len is the row length, a bound that stays the same from batch to batch (no recompiles, no host sync)
    assert mask.cu_seqlens.tolist() == [0, 2, 5, 6, 10, 12] and mask.max_len == 6 and mask.window == (-1, 0)
    assert varlen_mask(torch.zeros(2, 6, dtype=torch.int32), seq_len=6).cu_seqlens.tolist() == [0, 6, 12]
    assert varlen_mask(None, seq_len=6, sliding_window=3).window == (2, 0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_flex_forward_matches_sdpa_on_packed_rows(variant):
    model = tiny_model(**variant)
    ids, pos, docs = packed_batch(ROWS, seq_len=130)
    with torch.no_grad():
        ref = model(ids, position_ids=pos, document_ids=docs)
        model.set_attention_backend(FLEX)
        out = model(ids, position_ids=pos, document_ids=docs)
        unpacked = model(ids)  # no document ids: plain causal block mask
        model.set_attention_backend(layers.SDPA)
        unpacked_ref = model(ids)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(unpacked, unpacked_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_varlen_matches_sdpa_in_values_and_grads(cpu_varlen, variant):
    ids, pos, docs = packed_batch(ROWS, seq_len=130)
    labels = torch.randint(0, 64, ids.shape).masked_fill(docs < 0, -100)
    results = []
    for backend in (layers.SDPA, VARLEN):
        model = tiny_model(**variant)
        model.set_attention_backend(backend)
        logits = model(ids, position_ids=pos, document_ids=docs)
        loss = model(ids, position_ids=pos, document_ids=docs, labels=labels, reduction="sum")
        loss.backward()
        results.append((logits, {n: p.grad for n, p in model.named_parameters()}, model(ids)))
    (ref, ref_grads, ref_unpacked), (out, grads, unpacked) = results
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(unpacked, ref_unpacked, atol=1e-5, rtol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("backend", [layers.SDPA, FLEX, VARLEN], ids=lambda b: b.name)
def test_packed_equals_each_document_alone(cpu_varlen, backend):
    model = tiny_model()
    model.set_attention_backend(backend)
    ids, pos, docs = packed_batch([[7, 20, 9]], seq_len=40)
    with torch.no_grad():
        packed = model(ids, position_ids=pos, document_ids=docs)
        for start, end in ((0, 7), (7, 27), (27, 36)):
            alone = model(ids[:, start:end])
            torch.testing.assert_close(packed[:, start:end], alone, atol=1e-5, rtol=1e-5)


def test_gpu_backends_are_refused_on_cpu():
    model = tiny_model()
    for backend in ("flex", "varlen"):
        with pytest.raises(ValueError, match=f"model.attention={backend} needs a CUDA GPU"):
            apply_kernels(model, Config(model=ModelConfig(attention=backend)))
        with pytest.raises(ConfigError, match=f"model.attention={backend} needs a CUDA GPU"):
            load_config(None, ["model.preset=debug", "data.tokenizer=x", f"model.attention={backend}",
                               "train.device=cpu"])
    with pytest.raises(ConfigError, match="model.attention=varlen runs FlashAttention"):
        load_config(None, ["model.preset=debug", "data.tokenizer=x", "model.attention=varlen"])


# ------------------------------------------------------------------------------------------------------- GPU

def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def run_model(model, ids, pos, docs, labels):
    logits = model(ids, position_ids=pos, document_ids=docs)
    model(ids, position_ids=pos, document_ids=docs, labels=labels, reduction="sum").backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return logits, grads


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("backend", [FLEX, VARLEN], ids=lambda b: b.name)
@pytest.mark.parametrize("variant", VARIANTS)
def test_gpu_backend_matches_sdpa_bf16(backend, variant):
    """bf16 backend vs the fp32 SDPA reference, eager and with each block compiled, on rows of 200 tokens."""
    args = dict(dim=128, n_heads=4, n_kv_heads=2, ffn_dim=256, **variant)
    ids, pos, docs = packed_batch([[50, 60, 70], [120, 80]], seq_len=200, device="cuda")
    labels = torch.randint(0, 64, ids.shape, device="cuda").masked_fill(docs < 0, -100)
    ref_logits, ref_grads = run_model(tiny_model(device="cuda", **args), ids, pos, docs, labels)
    model = tiny_model(device="cuda", dtype=torch.bfloat16, **args)
    model.set_attention_backend(backend)
    eager = run_model(model, ids, pos, docs, labels)
    for block in model.layers:
        block.compile()
    compiled = run_model(model, ids, pos, docs, labels)
    for logits, grads in (eager, compiled):
        assert relative_error(logits, ref_logits) < 2e-2
        for name, grad in grads.items():
            assert relative_error(grad, ref_grads[name]) < 5e-2, name


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("backend", [FLEX, VARLEN], ids=lambda b: b.name)
def test_compiled_blocks_take_new_document_layouts_without_recompiling(backend):
    """Packed batches differ in how many documents they hold and how long the longest is: a compiled block must
    not recompile for that (on the H100 length-mix run varlen recompiled twice inside the timed epoch)."""
    from torch._dynamo.utils import counters

    model = tiny_model(device="cuda", dtype=torch.bfloat16, dim=128, n_heads=4, n_kv_heads=2, ffn_dim=256)
    model.set_attention_backend(backend)
    for block in model.layers:
        block.forward = torch.compile(block.forward, fullgraph=True)  # what compile.mode=blocks does
    layouts = [[[50, 60, 70], [120, 80]], [[200], [10, 20, 30, 40, 100]], [[199, 1], [66, 67, 67]]]
    for n, rows in enumerate(layouts):
        ids, pos, docs = packed_batch(rows, seq_len=200, device="cuda")
        model(ids, position_ids=pos, document_ids=docs, labels=ids, reduction="sum").backward()
        if n == 0:
            compiled = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == compiled, "a new document layout recompiled the blocks"

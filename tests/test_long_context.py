"""Long context (issue #12): every memory path equals the plain one on short sequences.

Offloaded checkpointing (bit for bit on CPU), the chunked MLP, RoPE scaling against transformers' own functions,
ring attention over 2 gloo processes against single-process attention (outputs and gradients; on 2 GPUs over NCCL
in bf16 too, a `gpu` test), the batch sharding, and the max-context search (injected predicate, one real
subprocess try, one try under torchrun with context parallelism).
"""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from optrush.bench.max_context import find_max_context, outcome, subprocess_try, with_memory_reason
from optrush.config import Config, ConfigError, load_config
from optrush.data.batch import IGNORE_INDEX, Batch
from optrush.models.io import build_model
from optrush.models.layers import rope_inv_freq, rope_tables
from optrush.models.presets import get_preset
from optrush.parallel.checkpointing import BlockOffloader, apply_activation_checkpointing, split_sizes
from optrush.parallel.compile import apply_compile
from optrush.parallel.context import (apply_context_extension, apply_context_parallel, block_backward, block_forward,
                                     chunk_ids, ring_attention, shard_batch)

ARGS = get_preset("debug", n_layers=3)
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny shapes on a shared CPU: one intra-op thread avoids spin-waiting on cores other processes hold."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def batch(seed: int = 0, *, rows: int = 2, length: int = 24, device: str = "cpu") -> dict:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, ARGS.vocab_size, (rows, length + 1), generator=g)
    return dict(input_ids=tokens[:, :-1].to(device), labels=tokens[:, 1:].to(device))


def activations(**values) -> Config:
    cfg = Config()
    for key, value in values.items():
        setattr(cfg.activations, key, value)
    return cfg


def loss_and_grads(model, inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(**inputs, reduction="sum")
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


# ------------------------------------------------------------------------------------------------------ offload

@pytest.mark.parametrize("policy", [dict(checkpointing="full"), dict(checkpointing="selective"),
                                    dict(checkpointing="full", every=2), dict()],
                         ids=["full", "selective", "full-every-2", "no-checkpointing"])
def test_offload_is_exact_on_cpu(policy):
    inputs = batch()
    ref_loss, ref_grads = loss_and_grads(apply_activation_checkpointing(build_model(ARGS, seed=0),
                                                                        activations(**policy)), inputs)
    model = apply_activation_checkpointing(build_model(ARGS, seed=0), activations(offload=True, **policy))
    for _ in range(2):  # the second step reuses the hooks: nothing may be left over from the first
        loss, grads = loss_and_grads(model, inputs)
        assert torch.equal(loss, ref_loss)
        for name, grad in ref_grads.items():
            assert torch.equal(grads[name], grad), name


def test_offloader_copies_block_inputs_and_prefetches_the_previous_block():
    model = apply_activation_checkpointing(build_model(ARGS, seed=0), activations(checkpointing="full"))
    offloader = BlockOffloader(torch.device("cpu"))
    offloader.attach(model.layers)
    fetched = []
    prefetch = offloader.prefetch
    offloader.prefetch = lambda index: (fetched.append(index), prefetch(index))
    loss = model(**batch(), reduction="sum")
    # full checkpointing saves each block's inputs: the hidden states, and the cos/sin tables that all blocks
    # share, which are copied once (by block 0)
    assert {i: len(v) for i, v in offloader.pending.items()} == {0: 3, 1: 1, 2: 1}
    loss.backward()
    assert offloader.pending == {}  # every record was claimed by its backward: nothing is kept across steps
    assert fetched[0] == 1 and set(fetched) == {-1, 0, 1}  # backward of block i prefetches block i-1


def test_skipped_blocks_keep_their_tensors_and_prefetch_the_last_offloaded_one(monkeypatch):
    """activations.skip_last=1: the last block copies nothing out, and its backward starts the copy back of the
    block before it, so the first block of backward does not wait for a synchronous copy."""
    offloaders, fetched_now = [], []
    attach, fetch_now = BlockOffloader.attach, BlockOffloader.fetch_now
    monkeypatch.setattr(BlockOffloader, "attach", lambda self, blocks: (offloaders.append(self), attach(self, blocks)))
    monkeypatch.setattr(BlockOffloader, "fetch_now", lambda self, record: (fetched_now.append(len(offloaders) - 1),
                                                                          fetch_now(self, record))[1])
    for skip in (0, 1):
        model = apply_activation_checkpointing(build_model(ARGS, seed=0),
                                               activations(checkpointing="full", offload=True, skip_last=skip))
        loss = model(**batch(), reduction="sum")
        assert set(offloaders[-1].pending) == set(range(ARGS.n_layers - skip))
        loss.backward()
        assert offloaders[-1].pending == {}
    # skip_last=0: the first block of backward fetches its hidden states and the shared RoPE tables now; both
    # runs fetch those tables again for their second reader (block 0, whose records they are)
    assert fetched_now.count(1) == fetched_now.count(0) - 3


def test_offloaded_tensors_come_back_with_their_layout():
    """Compiled blocks assert the strides of what they saved: attention's output is saved as a transposed view."""
    offloader = BlockOffloader(torch.device("cpu"))
    base = torch.randn(2, 6, 4, 3)
    dense = (base, base.transpose(1, 2), base[1:].transpose(1, 2), base[1:], base.permute(3, 0, 2, 1))
    for tensor in dense:  # a dense tensor comes back with its own layout
        back = offloader.unpack(offloader.pack(tensor, index=0, params=frozenset()), index=0)
        assert torch.equal(back, tensor) and back.stride() == tensor.stride(), tensor.stride()
    for strided in (base[..., ::2], base[:, 1:].transpose(1, 2)):  # not dense: copied, and back contiguous
        back = offloader.unpack(offloader.pack(strided, index=0, params=frozenset()), index=0)
        assert torch.equal(back, strided) and back.is_contiguous()


def test_compiled_selective_checkpointing_with_offload_matches_eager():
    """Selective checkpointing keeps attention's output; offloaded and reloaded, compiled blocks accept it."""
    inputs = batch()
    ref_loss, ref_grads = loss_and_grads(build_model(ARGS, seed=0), inputs)
    cfg = activations(checkpointing="selective", offload=True)
    cfg.compile.mode = "blocks"
    model = apply_compile(apply_activation_checkpointing(build_model(ARGS, seed=0), cfg), cfg)
    for _ in range(2):
        loss, grads = loss_and_grads(model, inputs)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-4)
        for name, grad in ref_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_pinned_pieces_are_powers_of_two_and_add_up():
    numel = 400_000 * 4096
    pieces = split_sizes(numel)
    assert sum(pieces) == numel and pieces == sorted(pieces, reverse=True)
    assert all(p & (p - 1) == 0 for p in pieces[:-1]) and pieces[-1] < 2 << 20
    assert split_sizes(1000) == [1000] and split_sizes(1 << 22) == [1 << 22]


@pytest.mark.gpu
@requires_cuda
def test_async_offload_on_gpu_matches_and_saves_memory():
    args = get_preset("debug", n_layers=4, dim=256, n_heads=4, n_kv_heads=2, ffn_dim=768)
    inputs = batch(rows=1, length=4096, device="cuda")
    results = {}
    for offload in (False, True):
        model = build_model(args, seed=0, device="cuda", dtype=torch.bfloat16)
        apply_activation_checkpointing(model, activations(checkpointing="full", offload=offload))
        loss_and_grads(model, inputs)  # warm-up: allocator and pinned-memory caches
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss = model(**inputs, reduction="sum")
        torch.cuda.synchronize()
        torch.empty(1, device="cuda")  # an allocation makes the allocator release blocks whose copies finished
        after_forward = torch.cuda.memory_allocated() - base
        loss.backward()
        torch.cuda.synchronize()
        results[offload] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, after_forward)
    assert torch.equal(results[True][0], results[False][0])
    for name, grad in results[False][1].items():
        assert torch.equal(results[True][1][name], grad), name
    # the 4 blocks' saved inputs (1 x 4096 x 256 bf16 each, plus cos/sin) are on the CPU after the forward pass
    assert results[True][2] < results[False][2] - 3 * 4096 * 256 * 2


# -------------------------------------------------------------------------------------------------- chunked MLP

@pytest.mark.parametrize("policy", [dict(), dict(checkpointing="full"), dict(checkpointing="selective"),
                                    dict(checkpointing="full", every=2, offload=True)],
                         ids=["alone", "full", "selective", "full-every-2+offload"])
def test_chunked_mlp_matches_plain(policy):
    inputs = batch(length=40)
    ref_loss, ref_grads = loss_and_grads(build_model(ARGS, seed=0), inputs)
    model = apply_activation_checkpointing(build_model(ARGS, seed=0), activations(mlp_chunk_tokens=16, **policy))
    loss, grads = loss_and_grads(model, inputs)  # 80 tokens in chunks of 16, 16, 16, 16, 16
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(model(inputs["input_ids"]), build_model(ARGS, seed=0)(inputs["input_ids"]))


@pytest.mark.parametrize("chunk", [0, 8])
def test_chunked_mlp_saves_no_intermediate_for_backward(chunk):
    model = apply_activation_checkpointing(build_model(ARGS, seed=0), activations(mlp_chunk_tokens=chunk))
    widest = 0

    def record(t):
        nonlocal widest
        if t.dim() and t.shape[-1] == ARGS.ffn_dim:
            widest = max(widest, t.numel() // ARGS.ffn_dim)
        return t

    with torch.autograd.graph.saved_tensors_hooks(record, lambda t: t):
        model(**batch(length=40), reduction="sum").backward()
    # plain: (80 tokens x ffn_dim) intermediates are saved; chunked and checkpointed: none at all
    assert widest == (0 if chunk else 80)


# ------------------------------------------------------------------------------------------------------- RoPE

ORIGINAL = 256
ROPE_CASES = {
    "linear": {"factor": 4.0},
    "dynamic": {"factor": 4.0, "original_max_position_embeddings": ORIGINAL},
    "yarn": {"factor": 4.0, "original_max_position_embeddings": ORIGINAL},
    "yarn-mscale": {"factor": 8.0, "original_max_position_embeddings": ORIGINAL, "beta_fast": 16, "mscale": 0.707,
                    "mscale_all_dim": 1.0},
    "llama3": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": ORIGINAL},
}


@pytest.mark.parametrize("case", ROPE_CASES)
def test_rope_scaling_matches_transformers(case):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope_type, head_dim, theta, length = case.split("-")[0], 64, 500000.0, 4 * ORIGINAL
    scaling = {"rope_type": rope_type, **ROPE_CASES[case]}
    # transformers' dynamic NTK reads the pretraining length from max_position_embeddings and the current length
    # from seq_len; optrush evaluates it once, at the table length
    hf = LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim,
                     max_position_embeddings=ORIGINAL if rope_type == "dynamic" else length,
                     rope_parameters={**scaling, "rope_theta": theta})
    ref, ref_factor = ROPE_INIT_FUNCTIONS[rope_type](hf, "cpu", **({"seq_len": length} if rope_type == "dynamic"
                                                                   else {}))
    ours, factor = rope_inv_freq(head_dim=head_dim, theta=theta, scaling=scaling, max_seq_len=length)
    assert torch.equal(ours, ref)
    assert factor == pytest.approx(ref_factor, rel=1e-12)


def test_set_rope_extends_the_tables_and_bakes_dynamic_ntk_into_theta():
    model = build_model(get_preset("debug", max_seq_len=ORIGINAL), seed=0)
    model.set_rope(scaling={"rope_type": "dynamic", **ROPE_CASES["dynamic"]}, max_seq_len=4 * ORIGINAL)
    assert model.rope_cos.shape[0] == 4 * ORIGINAL and model.args.rope_scaling is None
    inv_freq, _ = rope_inv_freq(head_dim=ARGS.head_dim, theta=10000.0,
                                scaling={"rope_type": "dynamic", **ROPE_CASES["dynamic"]}, max_seq_len=4 * ORIGINAL)
    torch.testing.assert_close(model.rope_cos, rope_tables(inv_freq, 1.0, seq_len=4 * ORIGINAL)[0])
    model.set_rope(scaling={"rope_type": "yarn", **ROPE_CASES["yarn"]}, max_seq_len=2 * ORIGINAL)
    assert model.args.rope_scaling["rope_type"] == "yarn" and model.rope_sin.shape[0] == 2 * ORIGINAL


def test_long_context_config_is_validated():
    cfg = load_config(None, ["model.preset=debug", "model.rope_scaling={rope_type: yarn, factor: 4.0, "
                             "original_max_position_embeddings: 4096}", "model.max_seq_len=16384",
                             "activations.mlp_chunk_tokens=4096", "context.degree=2", "data.packing=none",
                             "parallel.strategy=ddp"],
                      synthetic_data=True)
    assert cfg.model.rope_scaling["factor"] == 4.0 and cfg.context.layout == "zigzag"
    with pytest.raises(ConfigError, match="model.rope_scaling .rope_type llama3. needs low_freq_factor"):
        load_config(None, ["model.preset=debug", "model.rope_scaling={rope_type: llama3, factor: 8.0, "
                           "high_freq_factor: 4.0, original_max_position_embeddings: 8192}"], synthetic_data=True)
    with pytest.raises(ConfigError, match="data.packing"):
        load_config(None, ["model.preset=debug", "context.degree=2"], synthetic_data=True)


# ---------------------------------------------------------------------------------------- context parallelism

@pytest.mark.parametrize("layout, size, total", [("zigzag", 3, 12), ("contiguous", 5, 10)])
def test_shard_batch_pads_and_splits_rows(layout, size, total):
    rows = Batch(input_ids=torch.arange(10).expand(2, 10), labels=torch.arange(1, 11).expand(2, 10),
                 position_ids=torch.arange(10).expand(2, 10), attention_lengths=torch.tensor([10, 7]))
    shards = [shard_batch(rows, rank=r, world=2, layout=layout, pad_id=0) for r in range(2)]
    # zigzag: 10 tokens padded to 4 chunks of 3; contiguous: 2 chunks of 5, no padding
    order = [c for r in range(2) for c in chunk_ids(r, 2, layout)]
    pieces = {c: (s.position_ids[:, i * size:(i + 1) * size], s.labels[:, i * size:(i + 1) * size])
              for r, s in enumerate(shards) for i, c in enumerate(chunk_ids(r, 2, layout))}
    assert sorted(order) == list(range(len(order)))
    positions = torch.cat([pieces[c][0] for c in sorted(pieces)], dim=1)
    labels = torch.cat([pieces[c][1] for c in sorted(pieces)], dim=1)
    assert torch.equal(positions[0], torch.arange(total))
    assert labels[0, 10:].tolist() == [IGNORE_INDEX] * (total - 10) and torch.equal(labels[0, :10], torch.arange(1, 11))
    assert sum(s.attention_lengths.tolist()[1] for s in shards) == 7
    assert sum(s.num_padding for s in shards) == (total - 10) + (total - 7)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("causal", [True, False])
def test_flash_blocks_match_the_reference_blocks_on_gpu(causal):
    """The CUDA path of one ring block (FlashAttention's forward/backward ops, bf16) against the fp32 formula,
    with GQA heads and the backward fed a merged output and log-sum-exp, as the ring does."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dout = (torch.randn(1, h, 256, 64, device="cuda", generator=g, dtype=torch.bfloat16)
                     for h in (8, 2, 2, 8))
    out, lse, aux = block_forward(q, k, v, causal=causal, scale=0.125)
    ref_out, ref_lse, _ = block_forward(q.float(), k.float(), v.float(), causal=causal, scale=0.125)
    torch.testing.assert_close(out.float(), ref_out, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-3, atol=1e-3)
    grads = block_backward(dout, q, k, v, out, lse, causal=causal, scale=0.125, aux=aux)
    ref = block_backward(dout.float(), q.float(), k.float(), v.float(), ref_out, ref_lse, causal=causal,
                         scale=0.125, aux=None)
    for got, want in zip(grads, ref):
        torch.testing.assert_close(got, want, rtol=5e-2, atol=5e-2)


def ring_worker(rank: int, world: int, store: str) -> None:
    torch.set_num_threads(1)  # two processes on a shared CPU
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        group = dist.group.WORLD
        for layout in ("zigzag", "contiguous"):
            check_ring_attention(rank, world, layout, group)
        check_model(rank, world, group)
    finally:
        dist.destroy_process_group()


def check_ring_attention(rank, world, layout, group):
    g = torch.Generator().manual_seed(0)
    B, H, H_kv, T, D = 2, 4, 2, 16, 8
    q, k, v = (torch.randn(B, h, T, D, generator=g) for h in (H, H_kv, H_kv))
    grad = torch.randn(B, H, T, D, generator=g)
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.nn.functional.scaled_dot_product_attention(*full, is_causal=True, enable_gqa=True).backward(grad)
    size = T // (2 * world if layout == "zigzag" else world)

    def local(t):
        return torch.cat([t[:, :, c * size:(c + 1) * size] for c in chunk_ids(rank, world, layout)], dim=2)

    parts = [local(t).clone().requires_grad_() for t in (q, k, v)]
    out = ring_attention(*parts, mask=None, group=group, layout=layout)
    ref = local(torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    out.backward(local(grad))
    for part, whole in zip(parts, full):
        torch.testing.assert_close(part.grad, local(whole.grad), rtol=1e-5, atol=1e-6)


def check_model(rank, world, group):
    inputs = batch(length=22)  # padded to 24 = 4 zigzag chunks of 6
    rows = Batch(input_ids=inputs["input_ids"], labels=inputs["labels"], position_ids=torch.arange(22).expand(2, 22))
    ref_loss, ref_grads = loss_and_grads(build_model(ARGS, seed=0), inputs)
    cfg = Config()
    cfg.context.degree = world
    model = apply_context_parallel(build_model(ARGS, seed=0), cfg, group)
    apply_activation_checkpointing(model, activations(checkpointing="full"))
    local = shard_batch(rows, rank=rank, world=world, layout="zigzag")
    loss, grads = loss_and_grads(model, dict(input_ids=local.input_ids, labels=local.labels,
                                             position_ids=local.position_ids))
    dist.all_reduce(loss)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for name, grad in grads.items():
        dist.all_reduce(grad)
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_ring_attention_on_two_processes_matches_single_process():
    with tempfile.TemporaryDirectory() as tmp:
        # fork, not spawn, after autograd's lazy imports (sympy, via backward) have run here once: the children
        # then start in milliseconds instead of re-importing for seconds each on a busy CPU
        torch.ones(1, requires_grad=True).sum().backward()
        mp.start_processes(ring_worker, args=(2, os.path.join(tmp, "store")), nprocs=2, join=True,
                           start_method="fork")


def nccl_ring_worker(rank: int, world: int, store: str) -> None:
    torch.cuda.set_device(rank)  # before the first NCCL call: batch_isend_irecv hangs without it
    dist.init_process_group("nccl", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        for layout in ("zigzag", "contiguous"):
            check_ring_attention_on_gpu(rank, world, layout, dist.group.WORLD)
    finally:
        dist.destroy_process_group()


def attention_and_grads(q, k, v, grad) -> list[torch.Tensor]:
    """Causal attention of the whole sequence on one GPU (key/value heads repeated for GQA), and d(q, k, v)."""
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    q_, k_, v_ = leaves[0], *(t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in leaves[1:])
    out = torch.nn.functional.scaled_dot_product_attention(q_, k_, v_, is_causal=True)
    out.backward(grad)
    return [out.detach(), *(t.grad for t in leaves)]


def check_ring_attention_on_gpu(rank, world, layout, group):
    B, H, H_kv, S, D = 1, 8, 2, 8192, 128  # Llama-3.1-8B's head_dim and GQA ratio (32 / 8)
    g = torch.Generator().manual_seed(0)
    q, k, v, grad = (torch.randn(B, h, S, D, generator=g).to("cuda", torch.bfloat16) for h in (H, H_kv, H_kv, H))
    exact = attention_and_grads(q.float(), k.float(), v.float(), grad.float())
    one_gpu = attention_and_grads(q, k, v, grad)  # what training without context parallelism computes (flash)
    size = S // (2 * world if layout == "zigzag" else world)

    def local(t):
        return torch.cat([t[:, :, c * size:(c + 1) * size] for c in chunk_ids(rank, world, layout)], dim=2)

    parts = [local(t).clone().requires_grad_() for t in (q, k, v)]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = ring_attention(*parts, mask=None, group=group, layout=layout)
    out.backward(local(grad))
    torch.cuda.synchronize()
    # linear in the local length: a handful of (B, H, S / world, D) fp32 buffers; one fp32 score matrix of a
    # contiguous chunk against itself would be 512 MiB
    local_fp32 = B * H * (S // world) * D * 4
    assert torch.cuda.max_memory_allocated() - before < 24 * local_fp32, layout

    def error(got, want):
        return float((got.detach().float() - want).norm() / want.norm())

    for name, got, single, want in zip(("out", "dq", "dk", "dv"), [out, *(p.grad for p in parts)], one_gpu, exact):
        assert got.dtype == torch.bfloat16 and got.shape == local(want).shape, name
        # bf16 rounding as large as one GPU's own flash attention, not a wrong block, scale or log-sum-exp
        bound = 2 * error(local(single), local(want)) + 2e-3
        assert error(got, local(want)) < min(bound, 2e-2), (layout, name, error(got, local(want)), bound)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_ring_attention_over_nccl_matches_one_gpu_attention(tmp_path):
    """Ring attention on 2 GPUs over NCCL in bf16 (FlashAttention forward/backward per block, the log-sum-exp
    merge, batch_isend_irecv hops), zigzag and contiguous, against causal SDPA of the whole sequence on one GPU:
    outputs and q/k/v gradients, and memory linear in the local length."""
    mp.start_processes(nccl_ring_worker, args=(2, str(tmp_path / "store")), nprocs=2, join=True,
                       start_method="spawn")


# ------------------------------------------------------------------------------------------------ max context

def test_max_context_search_doubles_then_bisects():
    tried = []

    def fits_below(limit):
        def try_length(length):
            tried.append(length)
            return {"fits": length <= limit, "tokens_per_s": 1e6 / length, "peak_mem_gib": length / 1e4}
        return try_length

    result = find_max_context(Config(), start=1024, limit=1 << 20, try_length=fits_below(5000), log=lambda _: None)
    assert result["max_length"] == 4096 and tried == [1024, 2048, 4096, 8192, 6144, 5120]
    assert result["tokens_per_s"] == pytest.approx(1e6 / 4096) and not result["reached_limit"]
    tried.clear()
    result = find_max_context(Config(), start=1024, limit=3000, try_length=fits_below(10**9), log=lambda _: None)
    assert tried == [1024, 2048] and result["max_length"] == 2048 and result["reached_limit"]  # 3000 -> 2048
    tried.clear()
    assert find_max_context(Config(), start=1024, limit=4096, try_length=fits_below(10),
                            log=lambda _: None)["max_length"] is None


def test_max_context_from_a_short_start_searches_on_its_power_of_two():
    tried = []

    def try_length(length):
        tried.append(length)
        return {"fits": length <= 700, "tokens_per_s": 1.0, "peak_mem_gib": 0.1}

    result = find_max_context(Config(), start=300, limit=1 << 20, try_length=try_length, log=lambda _: None)
    assert result["multiple"] == 256 and tried == [256, 512, 1024, 768]
    assert result["max_length"] == 512
    with pytest.raises(ValueError, match=r"limit=100 \(--max-context LIMIT\).*data.max_length"):
        find_max_context(Config(), start=300, limit=100, try_length=try_length, log=lambda _: None)


def test_max_context_tells_memory_from_other_failures(tmp_path):
    assert outcome({"status": "failed", "reason": "OutOfMemoryError: CUDA out of memory"}) == {
        "fits": False, "reason": "OutOfMemoryError: CUDA out of memory"}
    with pytest.raises(RuntimeError, match="other than memory.*ConfigError"):
        outcome({"name": "length=64", "status": "skipped", "reason": "ConfigError: bad key"})
    # under torchrun, rank 1 ran out of memory and rank 0 was killed before writing a result: the log tells
    log = tmp_path / "length_64.log"
    log.write_text("[rank1]: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n"
                   "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\n=====\n")
    died = {"name": "length_64", "status": "failed", "reason": "exit code 1: ===== (log: ...)", "log": str(log)}
    assert not outcome(with_memory_reason(died))["fits"]
    log.write_text("RuntimeError: NCCL error\n")
    with pytest.raises(RuntimeError, match="other than memory.*exit code 1"):
        outcome(with_memory_reason(died))


def test_max_context_real_try_in_a_subprocess(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the child inherits it: see one_thread
    cfg = load_config(None, ["model.preset=debug", "train.device=cpu", "data.max_length=32",
                             f"output_dir={tmp_path}"], synthetic_data=True)
    result = subprocess_try(cfg, warmup=1, steps=1, timeout_s=300, logs=tmp_path)(48)
    assert result["fits"] and result["tokens_per_s"] > 0
    assert result["config"]["data"]["max_length"] == 48 and result["config"]["train"]["micro_batch_size"] == 1


def test_max_context_try_under_torchrun_with_context_parallelism(tmp_path, monkeypatch):
    """A try as 2 gloo processes under torchrun (ring attention over the row, FSDP over the same ranks): rank 0
    reports, the row's tokens count once, and the loss is the single-process loss of the same row."""
    from optrush.bench.run import bench

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    common = ["model.preset=debug", "train.device=cpu", "data.max_length=64", "objective=causal_lm",
              f"output_dir={tmp_path}", "train.micro_batch_size=1"]
    cfg = load_config(None, common + ["parallel.strategy=fsdp", "context.degree=2", "data.packing=none"],
                      synthetic_data=True)
    result = subprocess_try(cfg, warmup=0, steps=1, timeout_s=300, logs=tmp_path, nproc=2)(64)
    assert result["fits"] and result["world_size"] == 2
    assert result["tokens_per_s"] * result["step_s"] == pytest.approx(64)
    single = bench(load_config(None, common, synthetic_data=True), synthetic=True, warmup=0, steps=1)
    assert result["loss"] == pytest.approx(single["loss"], rel=1e-5)


def test_context_extension_from_the_config():
    cfg = load_config(None, ["model.preset=debug", "model.max_seq_len=8192",
                             "model.rope_scaling={rope_type: linear, factor: 2.0}"], synthetic_data=True)
    model = apply_context_extension(build_model(ARGS, seed=0), cfg)
    assert model.rope_cos.shape[0] == 8192 and model.args.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    plain = build_model(ARGS, seed=0)
    # linear scaling by 2: position p of the scaled tables is position p / 2 of the plain ones
    torch.testing.assert_close(model.rope_cos[10], plain.rope_cos[5])


def test_bench_cli_max_context_searches_from_the_configured_length(tmp_path, monkeypatch):
    from optrush.bench import max_context
    from optrush.cli.main import main

    seen = {}

    def fake_search(cfg, *, start, limit, warmup, steps):
        seen.update(start=start, limit=limit, steps=steps)
        return find_max_context(cfg, start=start, limit=limit, multiple=32, log=lambda _: None,
                                try_length=lambda n: {"fits": n <= 96, "tokens_per_s": 10.0, "peak_mem_gib": 0.1})

    monkeypatch.setattr(max_context, "find_max_context", fake_search)
    code = main(["bench", "model.preset=debug", "train.device=cpu", "data.max_length=32", f"output_dir={tmp_path}",
                 "--max-context", "128", "--steps", "1"])
    assert code == 0 and seen == {"start": 32, "limit": 128, "steps": 1}
    report = (tmp_path / "max_context.md").read_text()
    assert "Largest trainable length: **96** tokens" in report and "| 128 | no |" in report

"""Activation checkpointing, asynchronous CPU offload of saved activations, and the chunked MLP, per block.

    model = apply_activation_checkpointing(model, cfg)   # cfg.activations: checkpointing, every, skip_last,
                                                         #                  offload, mlp_chunk_tokens

Policies (`activations.checkpointing`):
- `full`: a block keeps only its inputs; backward reruns the whole block (about one extra forward: ~+33% compute).
- `selective`: a block keeps the outputs of its matmuls and attention and recomputes only the cheap pointwise ops
  (norms, RoPE, SiLU, residual adds), which cost little time but hold most of the activation bytes in eager mode,
  and the low-rank products of LoRA adapters, whose outputs are as large as the base linear's.
- `every: k` checkpoints blocks 0, k, 2k, ... only, trading memory back for speed.
- `skip_last: n` leaves the last n blocks alone (no checkpointing, no offload): backward reaches them first, so
  their activations live through the loss only. Where the loss's working memory sets the peak (the fused loss
  of a large vocabulary), smaller loss chunks pay for them (8B QLoRA, H100:
  `benchmarks/results/qlora_h100_skip_last.md`).

`activations.offload` sends what each block saves for backward to pinned CPU memory (`BlockOffloader`): with
`full` checkpointing that is the block's inputs, so GPU activation memory no longer grows with depth - the
long-context setting. The device-to-host copy runs on a side CUDA stream while the block computes; in backward,
when block i's saved tensors are first needed, block i-1's are already being copied back on the side stream
(prefetch), so the recomputation of block i-1 rarely waits for PCIe. Events order the streams. On CPU the same
code runs with plain copies (no streams), which is what the CPU tests check bit for bit. Parameters and buffers
that a block saves (the weights of its matmuls without checkpointing) are never copied: only activations are.

`activations.mlp_chunk_tokens` runs each SwiGLU MLP over chunks of that many tokens, each chunk checkpointed
(`chunk_feed_forward`): its (tokens x ffn_dim) intermediates never exist for the whole sequence at once, in the
forward pass nor in backward, at the price of recomputing the MLP's matmuls chunk by chunk. At 400k tokens of the
Llama-3.1-8B shape one (tokens x 14336) bf16 intermediate is 11 GiB; three of them live at once without chunking.

All are applied to the blocks in place (the block's `forward` becomes a checkpointed call; offload is a pair of
forward hooks), so parameter names, `state_dict` keys and optimizer state are exactly those of the plain model.
Checkpointing runs inside a compiled block (torch.compile sees the recompute tags and plans the recomputation),
while the offload hooks stay outside it: `optrush.parallel.compile` compiles each block's `forward`, never its
hooks, and whole-model compile is refused together with offload.

Measured on the Llama-3.2-1B shape, B=4 x S=2048, compiled blocks + fused loss, H100
(benchmarks/results/train_speed_h100.md): `selective` -3.0 GiB for 1% of speed, `full` -8.7 GiB for 14%, and the
earlier synchronous offload on top of `full` a further -0.5 GiB for 37%: offload pays only at long context
(benchmarks/long_context.py measures the asynchronous one).
"""
from __future__ import annotations

import functools
import weakref

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from optrush.config import Config

# Ops whose outputs the selective policy keeps: the matmuls and attention. Matched by name, so ops that a given
# torch build lacks (varlen attention before 2.10) simply never occur. Everything else is recomputed, among it
# QLoRA's quantized base matmuls (optrush::dequantized_matmul): keeping their outputs would spend what quantizing
# saved, while keeping attention alone buys most of the speed (8B QLoRA ladder, B=1, H100: selective 1.18x the
# tokens/s of full checkpointing for +0.5 GiB).
SAVED_OPS = frozenset({
    "aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_mm",
    "aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_efficient_attention",
    "aten::_scaled_dot_product_cudnn_attention", "aten::_scaled_dot_product_flash_attention_for_cpu",
    "torch_attn::_varlen_attn", "flex_attention",
})


def apply_activation_checkpointing(model: nn.Module, cfg: Config) -> nn.Module:
    """Chunk, checkpoint and/or offload the blocks in `model.layers` as `cfg.activations` says; returns the model."""
    ac = cfg.activations
    if ac.mlp_chunk_tokens:
        for block in model.layers:
            chunk_feed_forward(block.feed_forward, chunk_tokens=ac.mlp_chunk_tokens)
    handled = len(model.layers) - min(ac.skip_last, len(model.layers))  # the rest keep everything on the GPU
    if ac.checkpointing != "none":
        for index, block in enumerate(model.layers[:handled]):
            if index % ac.every == 0:
                checkpoint_block(block, selective=ac.checkpointing == "selective")
    if ac.offload:
        BlockOffloader(next(model.parameters()).device, offloaded=handled).attach(model.layers)
    return model


def checkpoint_block(block: nn.Module, *, selective: bool) -> None:
    """Make `block.forward` a non-reentrant checkpoint of itself (full, or selective with `SAVED_OPS` kept)."""
    forward = block.forward
    context_fn = selective_contexts if selective else None

    @functools.wraps(forward)
    def checkpointed_forward(*args, **kwargs):
        # preserve_rng_state=False: the blocks draw no random numbers (no dropout), so there is nothing to replay.
        # No context_fn at all for full checkpointing: torch 2.11's dynamo fails on an explicit noop_context_fn.
        if context_fn is None:
            return checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=False, context_fn=context_fn,
                          **kwargs)

    block.forward = checkpointed_forward


def save_costly_ops(ctx, func, *args, **kwargs) -> CheckpointPolicy:
    if func.name() not in SAVED_OPS or low_rank_product(func.name(), args):
        return CheckpointPolicy.PREFER_RECOMPUTE
    return CheckpointPolicy.MUST_SAVE


def low_rank_product(name: str, args: tuple) -> bool:
    """A matmul whose inner dimension is at most 1/8 of its output width: a LoRA adapter's (x A) B. Keeping it
    costs as much memory as the base linear's output (measured on the 1B ladder: LoRA/QLoRA under selective
    checkpointing held about 4.8 GiB more than the planner's model without it), recomputing it 2 r x out FLOPs per
    token, a few percent of the base matmul's."""
    if name not in ("aten::mm", "aten::addmm"):
        return False
    left, right = args[-2:]
    return left.shape[-1] * 8 <= right.shape[-1]


def selective_contexts():
    return create_selective_checkpoint_contexts(save_costly_ops)


# ------------------------------------------------------------------------------------------------- chunked MLP

def chunk_feed_forward(feed_forward: nn.Module, *, chunk_tokens: int) -> None:
    """Run `feed_forward` (any module mapping (..., dim) -> (..., dim) token by token, LoRA-wrapped or not) over
    chunks of `chunk_tokens` tokens, each chunk a non-reentrant checkpoint that saves only its slice of the input."""
    if chunk_tokens < 1:
        raise ValueError(f"activations.mlp_chunk_tokens={chunk_tokens}: must be >= 1 (0 turns chunking off)")
    forward = feed_forward.forward

    @functools.wraps(forward)
    def chunked_forward(x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        if tokens.shape[0] <= chunk_tokens:
            return forward(x)
        if torch.is_grad_enabled():
            outputs = [checkpoint(forward, chunk, use_reentrant=False, preserve_rng_state=False)
                       for chunk in tokens.split(chunk_tokens)]
        else:  # nothing is saved for backward, so plain chunks bound the memory without recomputation
            outputs = [forward(chunk) for chunk in tokens.split(chunk_tokens)]
        return torch.cat(outputs).view(*x.shape[:-1], -1)

    feed_forward.forward = chunked_forward


# --------------------------------------------------------------------------------------------------- offload

class _Offloaded:
    """One saved tensor in CPU memory (flat pieces in the tensor's memory order), its layout, the event that marks
    its copy done, and its prefetched device copy."""
    __slots__ = ("pieces", "shape", "stride", "dtype", "copied", "prefetched", "arrived", "__weakref__")

    def __init__(self, pieces: list[torch.Tensor], shape: torch.Size, stride: tuple[int, ...], dtype: torch.dtype,
                 copied: torch.cuda.Event | None):
        self.pieces, self.shape, self.stride, self.dtype, self.copied = pieces, shape, stride, dtype, copied
        self.prefetched: torch.Tensor | None = None
        self.arrived: torch.cuda.Event | None = None


def split_sizes(numel: int, *, floor: int = 1 << 20) -> list[int]:
    """`numel` as a sum of powers of two, largest first, with everything below `floor` lumped into one piece.

    PyTorch's caching pinned-memory allocator rounds every allocation up to a power of two, so a 3.3 GB block input
    (400k tokens x 4096 x bf16) would pin 4 GiB; pinned in power-of-two pieces, nothing is wasted but the last
    piece's rounding (< 2 x floor elements)."""
    pieces = [1 << bit for bit in range(numel.bit_length() - 1, -1, -1) if numel >> bit & 1 and 1 << bit >= floor]
    rest = numel - sum(pieces)
    return pieces + ([rest] if rest else [])


class BlockOffloader:
    """Saved-tensor hooks that keep each block's saved activations in (pinned) CPU memory, copied asynchronously.

        BlockOffloader(device).attach(model.layers)

    Forward of block i: every activation it saves is copied to CPU on the side stream (after the compute stream
    produced it) and the GPU tensor is released to the allocator once that copy finishes (`record_stream`). A
    tensor that several blocks save (the RoPE cos/sin tables gathered once per forward) is copied once.
    Backward: the first time block i unpacks a tensor, all of block i-1's tensors start their copy back on the side
    stream; block i's own wait on their events (or are copied now if no prefetch ran: the first block of backward).
    `offloaded=n`: only blocks 0..n-1 copy out; the later ones (activations.skip_last) keep what they save on the
    GPU, and their backward starts block n-1's copy back, so that no block of backward waits for a whole copy.
    """

    def __init__(self, device: torch.device, *, offloaded: int | None = None):
        self.device = torch.device(device)
        self.offloaded = offloaded
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        # per block index: the records of forwards whose backward has not reached that block yet (weak, so a
        # graph that is dropped without backward frees them)
        self.pending: dict[int, list[weakref.ref]] = {}
        # id(tensor) -> (the tensor, its version, its record), all weak: a tensor saved again is not copied again
        self.shared: dict[int, tuple[weakref.ref, int, weakref.ref]] = {}

    def attach(self, blocks: nn.ModuleList) -> None:
        for index, block in enumerate(blocks):
            self.attach_block(block, index)

    def attach_block(self, block: nn.Module, index: int) -> None:
        """Hooks: a saved-tensors context entered in a forward pre-hook and left in a forward hook that also
        runs when the forward raises."""
        contexts: list[torch.autograd.graph.saved_tensors_hooks] = []

        def enter(module, args):
            # weights and buffers (QLoRA's quantized codes) stay where they are: only activations move
            params = frozenset(t.untyped_storage().data_ptr() for t in (*module.parameters(), *module.buffers()))
            contexts.append(torch.autograd.graph.saved_tensors_hooks(
                functools.partial(self.pack, index=index, params=params),
                functools.partial(self.unpack, index=index)))
            contexts[-1].__enter__()

        def leave(module, args, output):
            contexts.pop().__exit__(None, None, None)

        block.register_forward_pre_hook(enter)
        block.register_forward_hook(leave, always_call=True)

    def pack(self, tensor: torch.Tensor, *, index: int, params: frozenset[int]):
        if tensor.device != self.device or tensor.untyped_storage().data_ptr() in params \
                or (self.offloaded is not None and index >= self.offloaded):
            return tensor  # a weight or buffer (or a CPU tensor on a GPU model, or a block that keeps its own)
        known = self.shared.get(id(tensor))
        if known is not None and known[0]() is tensor and known[1] == tensor._version \
                and (record := known[2]()) is not None:
            return record
        flat, stride = memory_order(tensor.detach())
        pieces = [torch.empty(n, dtype=tensor.dtype, pin_memory=self.stream is not None)
                  for n in split_sizes(flat.numel())]
        copied = None
        if self.stream is None:
            copy_pieces(flat, pieces)
        else:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                copy_pieces(flat, pieces)
                copied = self.stream.record_event()
            # the caching allocator must not hand this memory to the compute stream before the copy has read it
            tensor.record_stream(self.stream)
        record = _Offloaded(pieces, tensor.shape, stride, tensor.dtype, copied)
        self.pending.setdefault(index, []).append(weakref.ref(record))
        self.shared = {key: entry for key, entry in self.shared.items() if entry[0]() is not None}
        self.shared[id(tensor)] = (weakref.ref(tensor), tensor._version, weakref.ref(record))
        return record

    def unpack(self, record, *, index: int) -> torch.Tensor:
        self.claim(index)  # this block's records are consumed now, so nothing prefetches them later
        self.prefetch(index - 1)
        if isinstance(record, torch.Tensor):
            return record
        if record.prefetched is None:
            return self.fetch_now(record)
        tensor, record.prefetched = record.prefetched, None  # a second unpack (retain_graph) copies again
        if record.arrived is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(record.arrived)
            tensor.record_stream(current)  # allocated on the side stream, used and freed on the compute stream
        return tensor

    def claim(self, index: int) -> list[_Offloaded]:
        return [record for ref in self.pending.pop(index, []) if (record := ref()) is not None]

    def prefetch(self, index: int) -> None:
        """Start copying block `index`'s saved tensors back to the device (side stream on CUDA)."""
        for record in self.claim(index):
            if self.stream is None:
                record.prefetched = self.to_device(record)
                continue
            self.stream.wait_event(record.copied)
            with torch.cuda.stream(self.stream):
                record.prefetched = self.to_device(record)
                record.arrived = self.stream.record_event()

    def fetch_now(self, record: _Offloaded) -> torch.Tensor:
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_event(record.copied)
        return self.to_device(record)

    def to_device(self, record: _Offloaded) -> torch.Tensor:
        """A device copy of `record`, enqueued on the current stream (non-blocking from pinned memory)."""
        tensor = torch.empty_strided(record.shape, record.stride, dtype=record.dtype, device=self.device)
        copy_pieces(memory_order(tensor)[0], record.pieces, to_pieces=False)
        return tensor


def memory_order(tensor: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """A 1-D view of `tensor`'s elements in the order they lie in memory, and the strides that order restores.

    Compiled code asserts the exact strides of what it saved (attention's output is a transposed view), so a
    dense tensor comes back with its own layout; any other (a strided slice) is copied and comes back contiguous."""
    by_stride = sorted(range(tensor.dim()), key=lambda d: (tensor.stride(d), tensor.size(d)), reverse=True)
    dense = tensor.permute(by_stride)
    if dense.is_contiguous():
        return dense.view(-1), tensor.stride()
    flat = tensor.reshape(-1)
    return flat, flat.view(tensor.shape).stride()


def copy_pieces(flat: torch.Tensor, pieces: list[torch.Tensor], *, to_pieces: bool = True) -> None:
    """Copy the 1-D `flat` into consecutive `pieces`, or back (`to_pieces=False`), without blocking the host."""
    start = 0
    for piece in pieces:
        part = flat[start:start + piece.numel()]
        if to_pieces:
            piece.copy_(part, non_blocking=True)
        else:
            part.copy_(piece, non_blocking=True)
        start += piece.numel()

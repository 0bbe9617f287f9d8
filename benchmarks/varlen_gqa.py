"""Does torch's `varlen_attn` take grouped KV heads (fewer than the query heads) as they are? Compares output and
gradients against the same call with the KV heads repeated, and times both (forward + backward, CUDA only).

    python benchmarks/varlen_gqa.py          # prints the comparison and the two timings

Llama-3.2-1B's attention shape: 8,192 tokens in 4 documents of 2,048, 32 query heads, 8 KV heads of 64, bf16.
"""
import time

import torch

T, H, HKV, D, DOCS = 8192, 32, 8, 64, 4


def attend(q, k, v, cu):
    from torch.nn.attention.varlen import varlen_attn

    out = varlen_attn(q, k, v, cu, cu, T // DOCS, T // DOCS, window_size=(-1, 0))
    out.float().square().sum().backward()
    return out


def repeated(x: torch.Tensor) -> torch.Tensor:
    return x.repeat_interleave(H // HKV, dim=1)


def milliseconds(fn, *, repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    torch.manual_seed(0)
    cu = torch.arange(0, T + 1, T // DOCS, dtype=torch.int32, device="cuda")
    q, k, v = (torch.randn(T, h, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for h in (H, HKV, HKV))
    try:
        grouped = attend(q, k, v, cu)
    except Exception as error:  # noqa: BLE001 - the question is whether it raises
        print("grouped KV heads refused:", repr(error)[:500])
        return
    grads = [x.grad.clone() for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None
    reference = attend(q, repeated(k), repeated(v), cu)
    print(f"grouped KV heads taken; max |output difference| {float((grouped - reference).abs().max()):.3g}, max "
          f"|gradient difference| q/k/v {[float((a - b.grad).abs().max()) for a, b in zip(grads, (q, k, v))]}")
    print(f"grouped: {milliseconds(lambda: attend(q, k, v, cu)):.3f} ms forward+backward; repeated: "
          f"{milliseconds(lambda: attend(q, repeated(k), repeated(v), cu)):.3f} ms (T={T}, H={H}, Hkv={HKV})")


if __name__ == "__main__":
    main()

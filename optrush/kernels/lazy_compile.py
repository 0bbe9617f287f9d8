"""torch.compile and torch.compiler.disable, applied at a function's first call instead of at import.

Both import torch's compiler (dynamo and Inductor: about 3.5 s on a CPU) when they are called. Applied at module
level, they made every `optrush` process pay that at start-up, including the many that never compile (CPU runs,
data commands, tests). Wrapped with these, a process pays it the first time a compiled kernel actually runs.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch


def compile_on_first_call(fn: Callable, **options) -> Callable:
    """`torch.compile(fn, **options)`, built at the first call. Traced inside an enclosing compiled graph, `fn` is
    inlined, as dynamo inlines a nested compiled function."""
    compiled = None

    @functools.wraps(fn)
    def call(*args, **kwargs):
        nonlocal compiled
        if torch.compiler.is_compiling():
            return fn(*args, **kwargs)
        if compiled is None:
            compiled = torch.compile(fn, **options)
        return compiled(*args, **kwargs)
    return call


def never_traced(fn: Callable) -> Callable:
    """`torch.compiler.disable(fn)`, built at the first call: `fn` always runs eagerly, and an enclosing compiled
    graph breaks around it."""
    disabled = None

    @functools.wraps(fn)
    def call(*args, **kwargs):
        nonlocal disabled
        if disabled is None:
            disabled = torch.compiler.disable(fn)
        return disabled(*args, **kwargs)
    return call

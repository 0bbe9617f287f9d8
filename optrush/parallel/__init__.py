"""Model transforms that change how the model runs, not what it computes: activation checkpointing and offload
(`checkpointing.py`), torch.compile (`compile.py`); FSDP2 sharding will join them. Each is an
`apply_x(model, cfg) -> model`, called in order by `optrush.train.optimizations.apply_optimizations`."""

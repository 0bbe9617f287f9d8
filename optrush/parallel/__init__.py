"""Model transforms that change how the model runs, not what it computes: activation checkpointing and offload
(`checkpointing.py`), torch.compile (`compile.py`), data parallelism (`fsdp.py`: FSDP2, HSDP, DDP) with its process
group and mesh (`distributed.py`) and torchrun launch (`launch.py`). The transforms are `apply_x(model, cfg) ->
model` functions, called in order by `optrush.train.optimizations.apply_optimizations`."""

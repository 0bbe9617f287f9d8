"""`optrush plan`: an analytical memory model and a measured-calibrated speed model of a training step, the
search for the fastest configuration that fits, and the advice `train` prints after running out of memory.

    from optrush.plan import model_args, parse_gpus, plan, oom_advice
    gpu, n = parse_gpus("1xH100")
    best = plan(model_args("llama3.2-1b"), gpu=gpu, n_gpus=n, seq_len=4096)[0]

Modules: `setup` (the choices that matter), `memory` (one function per memory term), `speed` (throughput from
measured bench rows), `gpus` (the GPU table), `search` (candidates, config files, OOM advice), `measure`
(predicted vs measured on a device).
"""
from optrush.plan.gpus import GPU, GPUS, parse_gpus
from optrush.plan.memory import Memory, estimate_memory, required_gib
from optrush.plan.search import Candidate, config_yaml, model_args, oom_advice, plan
from optrush.plan.setup import Setup, config_overrides, setup_from_config

__all__ = ["GPU", "GPUS", "Candidate", "Memory", "Setup", "config_overrides", "config_yaml", "estimate_memory",
           "model_args", "oom_advice", "parse_gpus", "plan", "required_gib", "setup_from_config"]

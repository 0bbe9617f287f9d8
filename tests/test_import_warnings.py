"""torchao (and the `peft` library, which imports it) log "Failed to load ...so" for their CUDA extensions on a CPU
machine. optrush imports them only where a feature uses them (adamw8bit/4bit, optim.offload, fp8, the HF peers of
`optrush bench`), so importing optrush, a LoRA/QLoRA model included, stays quiet.

Importing optrush's modules loads no part of torch's compiler either (dynamo and Inductor: about 3.5 s at every
process start); the compiled kernels build themselves at their first call (optrush.kernels.lazy_compile)."""
import subprocess
import sys

PROBE = """
import sys
import optrush.cli.main, optrush.train, optrush.generate.evaluate, optrush.objectives.dpo, optrush.plan
print(sorted(name for name in ("torch._dynamo", "torch._inductor") if name in sys.modules))
from optrush.config import load_config
from optrush.models import build_model
from optrush.models.llama import ModelArgs
from optrush.peft import apply_lora, apply_quantize

cfg = load_config(None, ["model.preset=debug", "data.tokenizer=t", "peft.method=lora", "peft.quantize=nf4"])
model = build_model(ModelArgs(vocab_size=64, dim=64, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=128), seed=0)
apply_quantize(apply_lora(model, cfg), cfg)
print(sorted(name for name in ("torchao", "peft", "bitsandbytes") if name in sys.modules))
"""


def test_importing_optrush_loads_neither_torchao_nor_peft_nor_the_compiler():
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["[]", "[]"], result.stdout
    assert "Failed to load" not in result.stderr

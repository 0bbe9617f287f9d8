"""Peer stacks for `optrush bench --peers`: the same model, data and batch shape trained by other toolkits.

    python -m optrush.bench.peers hf_default CONFIG [key=value ...] [--synthetic] --warmup 1 --steps 3 --json-out F

`hf_default`: transformers' `Trainer` as most people run it: random-order batches padded to their longest row,
eager PyTorch, SDPA attention, its default AdamW and linear schedule. `hf_compile`: the same with
`torch_compile=True`. `hf_liger`: with `use_liger_kernel=True` (Liger's fused RMSNorm, RoPE, SwiGLU and linear
cross-entropy). `trl_sft_packed`: TRL's `SFTTrainer` with best-fit packing and padding-free batches (one row of
concatenated documents with restarting position ids). `hf_peft_qlora`: the usual QLoRA recipe, the QLoRA
ladder's peer: bitsandbytes NF4 base weights with double quantization, PEFT LoRA on all linears (the config's
`peft.r`, `peft.alpha`, `peft.dropout`), non-reentrant gradient checkpointing. Learning rate, AdamW betas/eps/weight decay, gradient
clipping, rows, micro-batches, `data.max_length` and the seed come from the config; precision is bf16 autocast
over fp32 weights on CUDA (`bf16=True`, the usual Trainer setting), fp32 on CPU. A peer whose package is not
installed is skipped by the ladder without starting a process.

Data: with `synthetic`, exactly the rows `optrush.bench.run.synthetic_batches` gives the rungs; otherwise the
config's tokenized examples (`build_datasets`, so the same truncation and loss masks). optrush's labels are
shifted, the HF ones are not (the model shifts): a row's HF labels are `[-100] + labels[:-1]`, which trains the
same targets except the row's last one. Timing and losses come from a `TrainerCallback` (`on_step_end` after a
device sync; `logging_steps=1`); token counts from a wrapper around the trainer's collator. Speed, MFU (the same
formula and peak as the rungs) and peak memory are measured exactly as `optrush.bench.run.bench` does.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import torch

from optrush.config import Config

PEERS = {"hf_default": "HF Trainer", "hf_compile": "HF Trainer + torch.compile", "hf_liger": "HF Trainer + Liger",
         "trl_sft_packed": "TRL SFTTrainer (padding-free packing)",
         "hf_peft_qlora": "HF Trainer + PEFT QLoRA (bitsandbytes NF4)"}
FULL_FINETUNE_PEERS = ("hf_default", "hf_compile", "hf_liger", "trl_sft_packed")
"""What `--peers` alone runs; hf_peft_qlora, the QLoRA ladder's peer, only when named."""
REQUIRES = {"hf_default": ["transformers", "accelerate"], "hf_compile": ["transformers", "accelerate"],
            "hf_liger": ["transformers", "accelerate", "liger_kernel"],
            "trl_sft_packed": ["transformers", "accelerate", "trl", "datasets"],
            "hf_peft_qlora": ["transformers", "accelerate", "peft", "bitsandbytes"]}


def peer_skip_reason(peer: str) -> str | None:
    missing = [name for name in REQUIRES[peer] if importlib.util.find_spec(name) is None]
    return f"not installed: {', '.join(missing)}" if missing else None


def save_peer_model(cfg: Config, path: Path, *, synthetic: bool) -> Path:
    """The config's preset (`model.preset`) in HF format at `path`, for transformers: initialised as the rungs
    do (seeded by `train.seed`), sized to the data's vocabulary, saved in bf16 (half the time and disk of fp32;
    every stack then loads the same rounded weights)."""
    from optrush.models.io import build_model, save_model
    from optrush.models.presets import get_preset

    vocab_size = get_preset(cfg.model.preset).vocab_size if synthetic else len(load_data_tokenizer(cfg))
    model = build_model(get_preset(cfg.model.preset, vocab_size=vocab_size), dtype=torch.bfloat16, device="cpu",
                        seed=cfg.train.seed)
    save_model(model, path)
    return path


def load_data_tokenizer(cfg: Config):
    from optrush.data.tokenizer import load_config_tokenizer

    return load_config_tokenizer(cfg)


# ------------------------------------------------------------------------------------------------------- data

def peer_rows(cfg: Config, *, synthetic: bool, vocab_size: int, n_steps: int) -> list[dict[str, list[int]]]:
    """Training rows in HF form (`input_ids`, unshifted `labels`), as in the module docstring."""
    if synthetic:
        from optrush.bench.run import synthetic_batches

        pairs = [(ids, labels) for step in synthetic_batches(cfg, vocab_size=vocab_size, n_steps=n_steps)
                 for batch in step for ids, labels in zip(batch.input_ids.tolist(), batch.labels.tolist())]
    else:
        from optrush.data.dataset import build_datasets

        examples, _, _ = build_datasets(cfg.data, load_data_tokenizer(cfg), seed=cfg.train.seed)
        pairs = [(e.input_ids, e.labels) for e in examples]
    return [{"input_ids": ids, "labels": [-100] + labels[:-1]} for ids, labels in pairs]


class PadCollator:
    """Pads a list of rows to the longest (HF's dynamic padding); labels -100 and attention_mask 0 on padding."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(row["input_ids"]), torch.tensor(row["labels"]), 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class CountingCollator:
    """Wraps a collator and records (positions, non-padding positions) of every batch it makes, in order."""

    def __init__(self, collate):
        self.collate, self.counts = collate, []

    def __call__(self, rows):
        batch = self.collate(rows)
        ids = batch["input_ids"]
        real = int(batch["attention_mask"].sum()) if "attention_mask" in batch else ids.numel()
        self.counts.append((ids.numel(), real))
        return batch


# ---------------------------------------------------------------------------------------------------- running

def run_peer(peer: str, cfg: Config, *, synthetic: bool, warmup: int, steps: int) -> dict:
    """Train `warmup + steps` optimizer steps with the peer stack; the same fields as `bench` returns."""
    from transformers import TrainerCallback

    from optrush.bench.provenance import package_version, provenance
    from optrush.train.loop import resolve_device, seed_everything
    from optrush.train.metrics import matmul_peak_flops, mfu, peak_memory_gib

    device = resolve_device(cfg.train.device)
    seed_everything(cfg.train.seed)
    started = time.perf_counter()
    model = load_peer_model(peer, cfg, device=device)
    n_steps, ga = warmup + steps, cfg.train.grad_accum
    rows = peer_rows(cfg, synthetic=synthetic, vocab_size=model.config.vocab_size, n_steps=n_steps)

    class Clock(TrainerCallback):
        def __init__(self):
            self.marks, self.losses = [], []

        def on_train_begin(self, args, state, control, **kwargs):
            sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            self.marks.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            sync(device)
            self.marks.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    clock = Clock()
    with tempfile.TemporaryDirectory() as scratch:
        trainer = build_trainer(peer, cfg, model=model, rows=rows, callback=clock, output_dir=scratch,
                                n_steps=n_steps, device=device, synthetic=synthetic)
        counter = CountingCollator(trainer.data_collator)
        trainer.data_collator = counter
        setup_s = time.perf_counter() - started
        trainer.train()

    seconds = [b - a for a, b in zip(clock.marks, clock.marks[1:])]
    if len(seconds) != n_steps:
        raise RuntimeError(f"{peer}: expected {n_steps} optimizer steps, the trainer made {len(seconds)}")
    timed = counter.counts[warmup * ga:n_steps * ga]
    timed_s = sum(seconds[warmup:])
    tokens, real_tokens = sum(t for t, _ in timed), sum(r for _, r in timed)
    params, flops_per_token = model_flops(cfg.model.path, seq_len=cfg.data.max_length)
    peak_flops = matmul_peak_flops(device, "bf16_mixed" if device.type == "cuda" else "fp32")
    return {
        "name": peer, "status": "ok",
        "tokens_per_s": tokens / timed_s, "real_tokens_per_s": real_tokens / timed_s,
        "mfu": mfu(tokens / timed_s, flops_per_token, peak_flops),
        "peak_mem_gib": peak_memory_gib(device),
        "peak_mem_kind": "cuda_allocated" if device.type == "cuda" else "cpu_peak_rss",
        "time_to_first_step_s": seconds[0], "step_s": timed_s / steps, "setup_s": setup_s,
        "loss": clock.losses[-1] if clock.losses else None, "losses": clock.losses,
        "padding_fraction": 1 - real_tokens / tokens, "warmup": warmup, "steps": steps, "synthetic": synthetic,
        "rows": cfg.train.micro_batch_size, "seq_len": cfg.data.max_length, "grad_accum": ga, "params": params,
        "flops_per_token": flops_per_token, "peak_flops": peak_flops,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "versions": {name: package_version(name) for name in ("transformers", "accelerate", "trl", "liger-kernel")},
        "provenance": provenance(),
    }


def model_flops(model_dir: str, *, seq_len: int) -> tuple[int, int]:
    """(parameters, training FLOPs per token) of the saved model by optrush's own count (`flops_per_token`), so
    the peers' MFU uses the rungs' formula; counted on the meta device (a 4-bit model's packed parameters would
    undercount)."""
    from optrush.models.hf import args_from_hf_config
    from optrush.models.io import read_config
    from optrush.models.llama import Transformer

    with torch.device("meta"):
        reference = Transformer(args_from_hf_config(read_config(Path(model_dir))))
    return reference.num_params(), reference.flops_per_token(seq_len)


def load_peer_model(peer: str, cfg: Config, *, device: torch.device):
    """fp32 weights (bf16 autocast on CUDA), or for hf_peft_qlora NF4 base weights under PEFT LoRA adapters."""
    from transformers import AutoModelForCausalLM

    if peer != "hf_peft_qlora":
        return AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.float32, attn_implementation="sdpa")
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(cfg.model.path, quantization_config=quantization, dtype=torch.bfloat16,
                                                 device_map={"": device.index or 0}, attn_implementation="sdpa")
    model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
    lora = LoraConfig(r=cfg.peft.r, lora_alpha=cfg.peft.alpha, lora_dropout=cfg.peft.dropout,
                      target_modules="all-linear")
    return get_peft_model(model, lora)


def build_trainer(peer: str, cfg: Config, *, model, rows, callback, output_dir: str, n_steps: int,
                  device: torch.device, synthetic: bool):
    """The peer's Trainer, configured from `cfg` as the module docstring says."""
    common = dict(output_dir=output_dir, per_device_train_batch_size=cfg.train.micro_batch_size,
                  gradient_accumulation_steps=cfg.train.grad_accum, max_steps=n_steps, learning_rate=cfg.train.lr,
                  adam_beta1=cfg.optim.betas[0], adam_beta2=cfg.optim.betas[1], adam_epsilon=cfg.optim.eps,
                  weight_decay=cfg.optim.weight_decay, max_grad_norm=cfg.train.max_grad_norm, logging_steps=1,
                  save_strategy="no", report_to="none", seed=cfg.train.seed, bf16=device.type == "cuda",
                  use_cpu=device.type != "cuda", dataloader_num_workers=0, disable_tqdm=True)
    if peer == "trl_sft_packed":
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        # completion_mask marks the trained positions (the config's loss mask); synthetic rows train everything
        records = [{"input_ids": r["input_ids"]} if synthetic else
                   {"input_ids": r["input_ids"], "completion_mask": [int(x != -100) for x in r["labels"]]}
                   for r in rows]
        args = SFTConfig(**common, max_length=cfg.data.max_length, packing=True, padding_free=True)
        return SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(records),
                          processing_class=peer_tokenizer(cfg), callbacks=[callback])

    from transformers import Trainer, TrainingArguments

    qlora = peer == "hf_peft_qlora"
    args = TrainingArguments(**common, torch_compile=peer == "hf_compile", use_liger_kernel=peer == "hf_liger",
                             gradient_checkpointing=qlora,
                             gradient_checkpointing_kwargs={"use_reentrant": False} if qlora else None)
    if synthetic:  # full rows, never padded; fed in the rungs' order so that the per-step losses overlay
        return in_order_trainer_class()(model=model, args=args, train_dataset=rows, data_collator=PadCollator(0),
                                         callbacks=[callback])
    return Trainer(model=model, args=args, train_dataset=rows, callbacks=[callback],
                   data_collator=PadCollator(load_data_tokenizer(cfg).pad_token_id))


def in_order_trainer_class():
    from transformers import Trainer

    class InOrderTrainer(Trainer):
        """The Trainer with its rows in dataset order instead of shuffled (nothing else changes)."""

        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    return InOrderTrainer


def peer_tokenizer(cfg: Config):
    """TRL needs a tokenizer for its pad/eos ids even on pre-tokenized rows: the data's, else a two-token stand-in
    (synthetic rows never go through it)."""
    if cfg.data.tokenizer is not None:
        return load_data_tokenizer(cfg)
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"<pad>": 0, "<eos>": 1}, unk_token="<pad>")),
                                   pad_token="<pad>", eos_token="<eos>")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    """The peer's process: measure it and write the result (or why it failed) as JSON to --json-out."""
    from optrush.bench.ladder import write_child_result
    from optrush.cli.args import add_config_arguments, config_from_args

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("peer", choices=sorted(PEERS))
    add_config_arguments(parser)
    parser.add_argument("--synthetic", action="store_true")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--json-out", required=True)
    args = parser.parse_args(argv)
    try:
        result = run_peer(args.peer, config_from_args(args, synthetic_data=args.synthetic), synthetic=args.synthetic,
                          warmup=args.warmup, steps=args.steps)
    except Exception as err:  # noqa: BLE001 - a failing peer (out of memory, compile error) is a result too
        import traceback

        traceback.print_exc()
        result = {"name": args.peer, "status": "failed", "reason": f"{type(err).__name__}: {err}"[:2000]}
    write_child_result(result, args.json_out)
    return 0 if result["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())

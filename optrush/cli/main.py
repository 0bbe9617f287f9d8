"""The `optrush` command line: the whole surface on one screen.

optrush train CONFIG [key=value ...] [--nproc N]
                                              train; every config key can be overridden; --nproc N runs N
                                              processes (one per GPU) through torchrun (see Multi-GPU)
optrush config show CONFIG [key=value ...]    print the resolved config (defaults + file + overrides)
optrush check CONFIG [key=value ...] [--only GROUP ...] [--steps N] [--json PATH]
                                              equivalence checks of the config's optimizations against plain
                                              references; writes <output_dir>/check.json, exits 1 on a failure
optrush data clean CONFIG [key=value ...] [--out DIR]
                                              apply data.clean.*; writes the cleaned JSONL and a report (markdown,
                                              JSON, token-length histograms as PNG) to <output_dir>/data_clean
optrush data stats CONFIG [key=value ...]     padding fraction, tokens per batch, batch count per data.packing
optrush data inspect CONFIG [key=value ...] [--n 2]
                                              show examples with trained and masked tokens marked
optrush score CKPT --data FILE [--column text] [--prompt-column C] [--batch-size 16]
                                              reward of every text of a JSONL file under a reward model
                                              (the final/ directory of an objective=reward run), one JSON line each
optrush bench CONFIG [key=value ...] [--synthetic] [--warmup N] [--steps M]
                                              time the config: tokens/s (all, non-padding), MFU, peak memory,
                                              time to first step, loss; JSON + markdown in <output_dir>
optrush bench CONFIG [key=value ...] --ladder default|FILE [--peers [NAMES]] [--out DIR] [--repeats R] [--resume]
                                              the optimization ladder, each rung in its own process, beside HF
                                              Trainer / TRL peers: JSON, markdown table, PNG charts in <out>
optrush bench CONFIG [key=value ...] --max-context [LIMIT]
                                              the largest data.max_length that trains (batch 1, each try in its
                                              own process): JSON + markdown in <output_dir>
optrush plan --model M --gpus 1xH100 --seq N [--objective sft] [--peft none|lora|qlora|any] [--micro-batch N]
             [--packing bfd|none|sorted] [--out FILE] [--measure]
                                              the fastest configurations that fit (predicted memory, tokens/s);
                                              the best as a ready config file (see "Plan a run")
optrush export CKPT (--merge | --adapter) --out DIR [--base MODEL]
                                              a LoRA run's checkpoint (or final/) as a merged HF model or a
                                              PEFT adapter (peft.PeftModel.from_pretrained loads it)
optrush export MODEL_DIR --gguf FILE [--gguf-dtype f16|bf16|f32]
                                              an HF model directory (a full fine-tune's or merged final/) as one
                                              GGUF file for llama.cpp/ollama (Llama, Mistral, Qwen2/3; byte-level
                                              BPE tokenizers; needs `pip install gguf`)
optrush generate CKPT --prompt TEXT [--prompts-file F] [--max-new-tokens N] [--temperature T] [--top-k K]
                 [--top-p P] [--min-p M] [--repetition-penalty R] [--stop S] [--seed N] [--token-healing]
                                              stream continuations, one prompt after another (KV-cache
                                              decoding; --seed N: one random stream for the whole command);
                                              --token-healing completes a prompt cut mid-word
optrush generate CKPT --prompt TEXT --penalty-alpha A --top-k K
                                              contrastive search (SimCTG, transformers' definition)
optrush chat CKPT [sampling options] [--system TEXT]
                                              chat through the tokenizer's chat template, one stdin line a turn
                                              (the oldest exchanges are dropped once the context is full)
optrush eval CKPT --data FILE [--format recipe] [--samples 4] [--out report.md] [data.on_error=skip ...]
                                              perplexity on held-out data + metrics of generated samples
                                              (repetition; recipes: parses, ingredients used); markdown report;
                                              data.* overrides say how records are read (on_error, columns)
optrush eval CKPT --data PAIRS --format preference [--reference DIR] [dpo.beta=0.1 ...]
                                              preference pairs: a reward model's ranking accuracy and reward
                                              gap, or a causal LM's own log-prob accuracy and the DPO eval
                                              metrics (reference: --reference, else the run's starting model)
optrush generate|chat|eval [BASE] --adapter DIR [--base BASE] ...
                                              a LoRA/DoRA adapter (PEFT format) on top of its base model
                                              (base: --base, BASE, or the adapter's base_model_name_or_path)
optrush average CKPT CKPT ... --out DIR       arithmetic mean of the weights of checkpoints of one run
optrush demo [--out DIR] [--steps N] [--records N]
                                              the offline end-to-end recipe demo
optrush tokenizer train --corpus FILE [--column text] --vocab-size N --out DIR
                                              a byte-level BPE tokenizer in HF format

Each command parses into a Config (or plain arguments) and calls the same library function a Python user calls.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from optrush.cli.args import add_config_arguments, config_and_overrides, config_from_args
from optrush.cli.bench import add_commands as add_bench_commands
from optrush.cli.data import add_commands as add_data_commands
from optrush.cli.generate import add_commands as add_generate_commands
from optrush.cli.plan import add_commands as add_plan_commands
from optrush.config import ConfigError


def cmd_train(args: argparse.Namespace) -> int:
    from optrush.parallel.launch import launched_by_torchrun, relaunch_with_torchrun

    cfg = config_from_args(args)  # a bad config fails here, before any process is started
    if args.nproc is not None and not launched_by_torchrun():
        from optrush.train.loop import check_before_start

        check_before_start(cfg)  # once, here, rather than in each of the processes
        config, overrides = config_and_overrides(args)
        return relaunch_with_torchrun(["train", *([config] if config else []), *overrides], nproc=args.nproc,
                                      cfg=cfg)
    from optrush.train import train

    train(cfg)
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    from optrush.config import load_config, to_yaml

    print(to_yaml(load_config(*config_and_overrides(args), complete=False)), end="")  # any machine, even unfinished
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from optrush.check import run_checks

    cfg = config_from_args(args)
    report = run_checks(cfg, only=args.only, steps=args.steps)
    report.print()
    path = report.write(args.json or Path(cfg.output_dir) / "check.json")
    print(f"wrote {path}")
    return 0 if report.passed else 1


def cmd_score(args: argparse.Namespace) -> int:
    import json

    from optrush.data.reader import read_records
    from optrush.data.tokenizer import load_tokenizer
    from optrush.generate.load import resolve
    from optrush.objectives.reward import load_reward_model, score_texts

    records = list(read_records(args.data))
    for number, record in records:
        for column, flag in ((args.column, "--column"), (args.prompt_column, "--prompt-column")):
            if column is not None and not isinstance(record.get(column), str):
                raise ConfigError(f"{args.data}:{number}: no string column {column!r}; choose it with {flag}")
    # a LoRA reward run's adapter keeps its tokenizer beside it (final/, a checkpoint), not in the base
    model_dir, adapter_dir, tokenizer_dir = resolve(args.ckpt, adapter=None, base=None)
    prompts = None if args.prompt_column is None else [record[args.prompt_column] for _, record in records]
    scores = score_texts(load_reward_model(adapter_dir or model_dir), load_tokenizer(tokenizer_dir),
                         [record[args.column] for _, record in records], prompts=prompts,
                         where=[f"{args.data}:{number}" for number, _ in records], batch_size=args.batch_size)
    for (number, _), score in zip(records, scores):
        print(json.dumps({"line": number, "score": round(score, 6)}))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    if args.gguf:
        from optrush.models.gguf import export_gguf

        print(f"wrote {export_gguf(args.ckpt, args.gguf, dtype=args.gguf_dtype)}")
        return 0
    from optrush.peft.export import export_checkpoint

    if args.out is None:
        raise ConfigError("optrush export --merge/--adapter needs --out DIR")
    out = export_checkpoint(args.ckpt, out=args.out, merge=args.merge, base=args.base)
    print(f"wrote {'the merged model' if args.merge else 'the PEFT adapter'} to {out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from optrush.cli.demo import run_demo

    run_demo(out_dir=args.out, steps=args.steps, records=args.records)
    return 0


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from optrush.data.corpus import corpus_texts
    from optrush.data.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(corpus_texts(args.corpus, column=args.column), vocab_size=args.vocab_size,
                                out_dir=args.out)
    print(f"trained a byte-level BPE of {len(tokenizer)} tokens on {args.corpus}; saved to {args.out}")
    return 0


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="optrush", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = root.add_subparsers(dest="command", required=True)

    p = add_config_arguments(commands.add_parser("train", help="train from a YAML config plus key=value overrides"))
    p.add_argument("--nproc", type=int, default=None,
                   help="run N processes on this machine (one per GPU) through torchrun; needs parallel.strategy")
    p.set_defaults(run=cmd_train)

    config = commands.add_parser("config", help="inspect configs").add_subparsers(dest="config_command",
                                                                                   required=True)
    p = add_config_arguments(config.add_parser("show", help="print the resolved config (defaults, file, overrides)"))
    p.set_defaults(run=cmd_config_show)

    add_bench_commands(commands)

    p = add_config_arguments(commands.add_parser(
        "check", help="check that the config's optimizations match plain references"))
    p.add_argument("--only", nargs="+", default=None, metavar="GROUP",
                   help="run only these groups: data truncation numerics packing accumulation kernels precision "
                        "peft resume multi_gpu")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps of the training checks (default: 6)")
    p.add_argument("--json", default=None, help="where to write the JSON report (default: <output_dir>/check.json)")
    p.set_defaults(run=cmd_check)

    add_data_commands(commands)

    p = commands.add_parser("score", help="score texts with a reward model (objective=reward run's final/)")
    p.add_argument("ckpt", help="reward model directory (HF layout plus tokenizer), e.g. runs/rm/final")
    p.add_argument("--data", required=True, help="JSONL file (or JSON array) of records holding the texts")
    p.add_argument("--column", default="text", help="column holding each text (default: text)")
    p.add_argument("--prompt-column", default=None,
                   help="column holding each text's prompt, scored as training scores a pair's side: prompt and "
                        "text tokenized apart (e.g. --prompt-column prompt --column chosen)")
    p.add_argument("--batch-size", type=int, default=16, help="texts per forward pass (default: 16)")
    p.set_defaults(run=cmd_score)

    add_generate_commands(commands)
    add_plan_commands(commands)

    p = commands.add_parser("export", help="export a LoRA checkpoint as a merged HF model or a PEFT adapter, "
                                                   "or an HF model as GGUF")
    p.add_argument("ckpt", help="a LoRA run's checkpoint (runs/x/checkpoints/step_...), its final/ directory, or "
                                "a PEFT adapter directory")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--merge", action="store_true", help="fold the adapters into the base: a plain HF model")
    what.add_argument("--adapter", action="store_true", help="the adapter alone, in PEFT format")
    what.add_argument("--gguf", metavar="FILE", default=None,
                      help="an HF model directory (e.g. merged final/) as a GGUF file for llama.cpp (pip install gguf)")
    p.add_argument("--gguf-dtype", choices=["f16", "bf16", "f32"], default="f16",
                   help="GGUF matrix dtype (default: f16)")
    p.add_argument("--out", default=None, help="output directory (--merge, --adapter)")
    p.add_argument("--base", default=None,
                   help="base model directory (default: base_model_name_or_path of the adapter_config.json)")
    p.set_defaults(run=cmd_export)

    p = commands.add_parser("demo", help="offline end-to-end recipe demo on CPU (about 2 minutes)")
    p.add_argument("--out", default="demo_run", help="output directory (default: demo_run)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the demo recipe's)")
    p.add_argument("--records", type=int, default=None, help="synthetic recipes to generate")
    p.set_defaults(run=cmd_demo)

    tokenizer = commands.add_parser("tokenizer", help="tokenizer tools").add_subparsers(dest="tokenizer_command",
                                                                                         required=True)
    p = tokenizer.add_parser("train", help="train a byte-level BPE tokenizer and save it in HF format")
    p.add_argument("--corpus", required=True, help="a JSONL file (text column) or a .txt file (one document a line)")
    p.add_argument("--column", default="text", help="JSONL column holding the text (default: text)")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(run=cmd_tokenizer_train)
    return root


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Like `parse_args`, but key=value overrides may also follow the flags (`optrush bench CFG --steps 2 a.b=1`)."""
    root = parser()
    args, extra = root.parse_known_args(argv)
    if getattr(args, "only", None):  # `--only GROUP ...` takes every word after it, overrides included
        extra = [item for item in args.only if "=" in item] + extra
        args.only = [item for item in args.only if "=" not in item]
    stray = [item for item in extra if item.startswith("-") or "=" not in item]
    if stray or (extra and not hasattr(args, "overrides")):
        root.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return args.run(args)
    except ConfigError as err:
        report_error(f"config error: {err}")
        return 2
    except KeyboardInterrupt as interrupt:
        # Ctrl-C is the user's choice, not a failure to debug: where it stopped (train says so), not the stack
        if os.environ.get("OPTRUSH_TRACEBACK"):
            raise
        report_error(str(interrupt) or "interrupted")
        return 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C
    except (OSError, ValueError) as err:
        # Bad input (a missing file, a value out of range) is the user's to fix: its message, not our stack.
        from optrush.data.reader import DataError  # imported late: it loads torch, which `config show` never needs

        if os.environ.get("OPTRUSH_TRACEBACK"):
            raise
        kind = "data error" if isinstance(err, DataError) else f"error ({type(err).__name__})"
        report_error(f"{kind}: {err}\n(OPTRUSH_TRACEBACK=1 shows where it was raised)")
        return 2


def report_error(message: str) -> None:
    """Print `message` for the user; in one of the N processes of `optrush train --nproc N`, hand it to the
    launcher instead, which prints each distinct message of the N once (optrush.parallel.launch)."""
    from optrush.parallel.launch import hand_error_to_launcher

    if not hand_error_to_launcher(message):
        print(f"optrush: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())

"""`optrush generate|chat|average`: use a trained checkpoint.

    optrush generate CKPT --prompt "Recipe: Lemon Pasta" [--prompts-file F] [--max-new-tokens 200]
                     [--temperature 0.7 --top-k 40 --top-p 0.9 --min-p 0.05 --repetition-penalty 1.1]
                     [--stop S ...] [--seed 0] [--device cuda]     stream continuations to stdout
                     [--token-healing] | [--penalty-alpha 0.6 --top-k 4]   healing; contrastive search
    optrush chat CKPT [sampling options]                           a chat on stdin/stdout (chat template)
    optrush average CKPT CKPT ... --out DIR                        arithmetic mean of the weights
    optrush eval CKPT --data FILE [--format recipe] [--samples 4] [--out report.md] [data.on_error=skip ...]
                                                                   perplexity + sample metrics, markdown report
    optrush eval CKPT --data PAIRS --format preference [--reference DIR] [dpo.beta=0.1 ...]
                                                                   reward model / DPO policy metrics on pairs

CKPT is an HF-format directory holding the tokenizer too (a run's final/ or step_N/ directory). Every command
but average also takes `--adapter DIR [--base BASE]`: a LoRA/DoRA adapter in PEFT format loaded on top of a base
model (optrush.generate.load); CKPT may then be left out, or be the adapter directory itself.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from optrush.config import ConfigError


def _load(args: argparse.Namespace):
    from optrush.generate.load import generation_device, load_for_generation

    device = generation_device(args.device)  # a device this machine lacks stops here, before the model loads
    return load_for_generation(args.ckpt, adapter=args.adapter, base=args.base, device=device)


# values of options left unset (None): None tells contrastive search that the user did not give the option
DEFAULTS = {"temperature": 0.7, "repetition_penalty": 1.0}
# the options of `Sampling`; eval takes only --temperature of them
SAMPLING = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")
# contrastive search is deterministic: these sampling options would be ignored by it
SAMPLING_ONLY = {"temperature": "--temperature", "top_p": "--top-p", "min_p": "--min-p",
                 "repetition_penalty": "--repetition-penalty", "seed": "--seed"}


def _option(args: argparse.Namespace, name: str):
    value = getattr(args, name)
    return DEFAULTS.get(name) if value is None else value


def _sampling_kwargs(args: argparse.Namespace, generator) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, generator=generator,
                **{name: _option(args, name) for name in SAMPLING})


def _generator(args: argparse.Namespace):
    """One generator for the whole command, seeded once: each prompt (each chat turn) draws the next random
    numbers, so different prompts get different draws and the same --seed repeats the whole output. Unseeded:
    torch's global generator."""
    import torch

    return None if args.seed is None else torch.Generator().manual_seed(args.seed)


def _check_sampling(args: argparse.Namespace) -> None:
    """Out-of-range sampling options stop the command before the model loads and before any text is printed,
    naming the option."""
    from optrush.generate.sample import Sampling

    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens}: ask for at least 1 new token")
    try:
        Sampling(**{name: _option(args, name) for name in SAMPLING if hasattr(args, name)})
    except ValueError as err:  # the message starts with the parameter's name: "top_p=1.5: use ..."
        name, _, reason = str(err).partition("=")
        reason = reason.replace("or None for", "or leave the option out for")
        raise ConfigError(f"--{name.replace('_', '-')} {reason}") from None


def _check_room(model, args: argparse.Namespace, *, prompt_tokens: int) -> None:
    """The prompt and the new tokens must fit the model's context: checked before any text is printed."""
    limit = model.args.max_seq_len
    if prompt_tokens + args.max_new_tokens > limit:
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens}: the model's context holds {limit} "
                          f"tokens (max_seq_len), of which the (longest) prompt takes {prompt_tokens}; ask for at "
                          f"most {max(limit - prompt_tokens, 0)} new tokens, or shorten the prompt")


def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise ConfigError(f"prompts file not found: {path}")
        # One prompt a line; a literal \n inside a line stands for a newline (recipe prompts span lines).
        prompts += [line.replace("\\n", "\n") for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ConfigError("no prompt: give --prompt TEXT (repeatable) or --prompts-file FILE")
    return prompts


def cmd_generate(args: argparse.Namespace) -> int:
    from optrush.generate.contrastive import contrastive_search
    from optrush.generate.decode import cut_at_stop, generate_texts

    _check_sampling(args)
    if args.penalty_alpha is not None:
        _check_contrastive(args)
    prompts = _prompts(args)
    model, tokenizer = _load(args)
    _check_room(model, args, prompt_tokens=max(len(tokenizer.encode(prompt)) for prompt in prompts))
    generator = _generator(args)
    for number, prompt in enumerate(prompts):
        if len(prompts) > 1:
            print(f"--- prompt {number + 1}/{len(prompts)}")
        sys.stdout.write(prompt)
        if args.penalty_alpha is not None:
            new_ids = contrastive_search(model, tokenizer.encode(prompt), penalty_alpha=args.penalty_alpha,
                                         top_k=args.top_k, max_new_tokens=args.max_new_tokens,
                                         eos_id=tokenizer.eos_token_id)
            sys.stdout.write(cut_at_stop(tokenizer.decode(new_ids, skip_special_tokens=True), args.stop or ()))
        else:
            # one prompt at a time so that the text streams in order; library users batch with generate_texts
            generate_texts(model, tokenizer, [prompt], stop=args.stop or (), token_healing=args.token_healing,
                           on_text=lambda row, piece: (sys.stdout.write(piece), sys.stdout.flush()),
                           **_sampling_kwargs(args, generator))
        sys.stdout.write("\n")
    return 0


def _check_contrastive(args: argparse.Namespace) -> None:
    if not 0 <= args.penalty_alpha <= 1:
        raise ConfigError(f"--penalty-alpha {args.penalty_alpha}: use a degeneration penalty in [0, 1]")
    if args.top_k is None or args.token_healing:
        raise ConfigError("--penalty-alpha (contrastive search) needs --top-k K and does not combine with "
                          "--token-healing")
    ignored = [flag for name, flag in SAMPLING_ONLY.items() if getattr(args, name) is not None]
    if ignored:
        raise ConfigError(f"{', '.join(ignored)}: contrastive search (--penalty-alpha) picks each token "
                          "deterministically from the --top-k candidates and takes no sampling options; leave them "
                          "out, or drop --penalty-alpha to sample")


def cmd_chat(args: argparse.Namespace) -> int:
    from optrush.data.tokenizer import IM_END
    from optrush.generate.decode import generate_batch

    _check_sampling(args)
    model, tokenizer = _load(args)
    generator = _generator(args)
    vocab = tokenizer.get_vocab()
    eos = [tokenizer.eos_token_id] + ([vocab[IM_END]] if IM_END in vocab else [])
    messages = [{"role": "system", "content": args.system}] if args.system else []
    first_turn = tokenizer.apply_chat_template([*messages, {"role": "user", "content": ""}],
                                               add_generation_prompt=True, tokenize=False)
    _check_room(model, args, prompt_tokens=len(tokenizer.encode(first_turn, add_special_tokens=False)))
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            return 0
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        ids, kept = _fit_chat(tokenizer, messages, room=model.args.max_seq_len - args.max_new_tokens)
        if ids is None:
            messages.pop()
            print(f"optrush: this message does not fit the model's context ({model.args.max_seq_len} tokens, "
                  f"--max-new-tokens {args.max_new_tokens} of them for the reply): send a shorter one",
                  file=sys.stderr, flush=True)
            continue
        if len(kept) < len(messages):
            print(f"(the conversation outgrew the model's context of {model.args.max_seq_len} tokens: the oldest "
                  f"{(len(messages) - len(kept)) // 2} exchange(s) are forgotten)", file=sys.stderr, flush=True)
            messages = kept
        new_ids = generate_batch(model, [ids], eos_id=eos, pad_id=tokenizer.pad_token_id or 0,
                                 **_sampling_kwargs(args, generator))[0]
        reply = tokenizer.decode([t for t in new_ids if t not in eos], skip_special_tokens=True)
        print(f"assistant> {reply}", flush=True)
        messages.append({"role": "assistant", "content": reply})


def _fit_chat(tokenizer, messages: list[dict], *, room: int) -> tuple[list[int] | None, list[dict]]:
    """(prompt token ids, the messages they hold): the chat with its oldest user/assistant exchanges left out (a
    system message kept) until it fits `room` tokens; ids None when the last user message alone does not fit."""
    first = 1 if messages[0]["role"] == "system" else 0
    for dropped in range(0, len(messages) - first, 2):  # whole exchanges: the kept turns still start with a user's
        kept = messages[:first] + messages[first + dropped:]
        text = tokenizer.apply_chat_template(kept, add_generation_prompt=True, tokenize=False)
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) <= room:
            return ids, kept
    return None, messages


def cmd_average(args: argparse.Namespace) -> int:
    from optrush.models.average import average_checkpoints

    average_checkpoints(args.ckpts, out=args.out)
    print(f"averaged {len(args.ckpts)} checkpoints -> {args.out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from optrush.generate.evaluate import evaluate, report_markdown

    _check_sampling(args)
    ckpt, overrides = args.ckpt, args.overrides
    if ckpt is not None and "=" in ckpt and not Path(ckpt).exists():  # `eval --adapter A data.on_error=skip`
        ckpt, overrides = None, [ckpt, *overrides]
    if args.out:  # made now (as export --gguf makes its file's): a report that cannot be written fails before the work
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    report = evaluate(ckpt, data=args.data, data_format=args.format, max_length=args.max_length,
                      samples=args.samples, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                      device=args.device, adapter=args.adapter, base=args.base, reference=args.reference,
                      data_overrides=overrides)
    markdown = report_markdown(report)
    print(markdown)
    if args.out:
        Path(args.out).write_text(markdown)
        Path(args.out).with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out} and {Path(args.out).with_suffix('.json')}")
    return 0


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt", nargs="?", default=None,
                   help="HF-format checkpoint directory with its tokenizer, e.g. runs/x/final (or a PEFT adapter "
                        "directory); may be left out with --adapter")
    p.add_argument("--adapter", default=None, help="a LoRA/DoRA adapter directory (PEFT format) to load on top of "
                                                   "the base model")
    p.add_argument("--base", default=None, help="the adapter's base model directory (default: CKPT, else the "
                                                "adapter config's base_model_name_or_path)")


def _add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    _add_model_arguments(p)
    p.add_argument("--max-new-tokens", type=int, default=256, help="(default: 256)")
    p.add_argument("--temperature", type=float, default=None,
                   help=f"0 = greedy (default: {DEFAULTS['temperature']})")
    p.add_argument("--top-k", type=int, default=None, help="keep the K most likely tokens (default: all)")
    p.add_argument("--top-p", type=float, default=None,
                   help="keep the most likely tokens holding this probability, in (0, 1] (default: all)")
    p.add_argument("--min-p", type=float, default=None,
                   help="drop tokens less likely than this times the most likely one, in [0, 1] (default: none)")
    p.add_argument("--repetition-penalty", type=float, default=None, help="1.0 = off (default)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed the one sampling generator of the whole command (every prompt or turn draws on): the "
                        "same seed repeats the whole output (default: unseeded)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")


def add_commands(commands) -> None:
    p = commands.add_parser("generate", help="stream continuations of prompts from a checkpoint")
    _add_sampling_arguments(p)
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompts-file", default=None, help="a text file of prompts, one a line (\\n = newline)")
    p.add_argument("--stop", action="append", help="stop string (repeatable); the output ends before it")
    p.add_argument("--penalty-alpha", type=float, default=None,
                   help="contrastive search with this degeneration penalty in [0, 1] among --top-k candidates")
    p.add_argument("--token-healing", action="store_true",
                   help="back off the prompt's last token and make the first new token extend its text")
    p.set_defaults(run=cmd_generate)

    p = commands.add_parser("chat", help="chat with a checkpoint through its chat template (stdin lines)")
    _add_sampling_arguments(p)
    p.add_argument("--system", default=None, help="a system message")
    p.set_defaults(run=cmd_chat)

    p = commands.add_parser("eval", help="perplexity on held-out data and metrics of generated samples; on "
                                         "preference pairs, reward model or DPO policy metrics")
    _add_model_arguments(p)
    p.add_argument("--data", required=True, help="held-out JSONL file")
    p.add_argument("--format", default="recipe",
                   help="data.format of the file (default: recipe); preference: pairs, scored by a reward model or "
                        "a causal LM (DPO metrics)")
    p.add_argument("--max-length", type=int, default=2048,
                   help="longer examples are truncated, longer pairs dropped and counted (default: 2048)")
    p.add_argument("--samples", type=int, default=None,
                   help="prompts of the file to generate from, 0 or more (default: 4; format=text: the start of "
                        "each document; preference data draws none)")
    p.add_argument("--reference", default=None,
                   help="--format preference: the DPO reference model directory (the model the DPO run started "
                        "from; default: the run's model.path recorded in its summary.json)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--out", default=None, help="write the markdown report here (and a .json beside it)")
    p.add_argument("overrides", nargs="*", help="how the records are read, e.g. data.on_error=skip (count and skip "
                                                "malformed rows) data.text_column=body; --format preference: "
                                                "also dpo.loss, dpo.beta, dpo.label_smoothing, dpo.simpo_gamma, "
                                                "reward.margin (default: the run's own)")
    p.set_defaults(run=cmd_eval)

    p = commands.add_parser("average", help="average the weights of checkpoints of one run")
    p.add_argument("ckpts", nargs="+", help="checkpoint directories")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(run=cmd_average)

#!/usr/bin/env bash
# Issue #10: the optimization ladder on one H100, side by side with the peer stacks, written to benchmarks/results/.
#
#   benchmarks/ladder_h100.sh 1b         Llama-3.2-1B shape, B=4 x S=2048, the built-in ladder (--ladder default)
#                                        + HF Trainer (default, torch.compile, Liger) and TRL SFTTrainer peers
#                                        -> benchmarks/results/ladder_1b_h100/ (ladder.json, .md, ladder_*.png)
#   benchmarks/ladder_h100.sh qlora8b    Llama-3.1-8B shape, B=4 x S=2048, benchmarks/ladders/qlora_8b.yaml
#                                        + the HF + PEFT + bitsandbytes QLoRA peer (needs bitsandbytes==0.50.2)
#                                        -> benchmarks/results/ladder_qlora8b_b4_h100/
#                                        (ladder_qlora8b_h100/ is an earlier B=1 run of an earlier ladder file)
#                                        (with a peer, the 8B model is saved once in bf16: about 16 GB of disk)
#   benchmarks/ladder_h100.sh --smoke    the QLoRA ladder file + the HF peer on the debug model on CPU, in
#                                        /tmp/optrush-ladder-smoke (checks this script; about 3 minutes)
#
# Random init, synthetic uniform tokens (so the +packing rung reports "skipped": full rows have nothing to pack).
# Every rung and peer runs in its own process (`optrush bench --ladder`); logs in <out>/logs/. Peers need their
# wheels (../shared/gpu/fetch-wheels trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
# liger-kernel==0.8.5 bitsandbytes==0.50.2, installed with --target /tmp/site and PYTHONPATH=/tmp/site);
# missing ones are skipped.
# Budget: about 12 rung processes + 4 peers at 20-60 s each (start-up, model build, compile): close to the
# 10-minute limit of one device command. If it runs out, run the same command again with `--resume` (the
# rungs and peers finished into <out>/finished.jsonl are kept; the saved model is reused): e.g.
#   benchmarks/ladder_h100.sh qlora8b            # device call 1: cut off by the time limit after some rungs
#   benchmarks/ladder_h100.sh qlora8b --resume   # device call 2, with call 1's <out>/finished.jsonl in place
# (on a fresh machine only finished.jsonl needs carrying over; the shared model is saved again). The script execs
# the bench, so a `timeout -s INT` on it reaches the bench, which then stops the rung it is running (no GPU process
# outlives the command).
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:?usage: benchmarks/ladder_h100.sh 1b|qlora8b|--smoke}
# overrides (positional) must all come before the options
common=(train.device=cuda objective=causal_lm train.schedule=constant train.max_steps=1000 output_dir=/tmp/optrush-ladder)
options=(--synthetic --warmup 3 --steps 8 "${@:2}")  # e.g. --resume
case "$what" in
  1b)
    exec python -m optrush bench model.preset=llama3.2-1b train.micro_batch_size=4 data.max_length=2048 train.lr=1e-5 \
      "${common[@]}" "${options[@]}" --ladder default --out benchmarks/results/ladder_1b_h100 --peers ;;
  qlora8b)
    exec python -m optrush bench model.preset=llama3.1-8b train.micro_batch_size=4 data.max_length=2048 train.lr=1e-4 \
      "${common[@]}" "${options[@]}" --ladder benchmarks/ladders/qlora_8b.yaml \
      --out benchmarks/results/ladder_qlora8b_b4_h100 --peers hf_peft_qlora ;;
  --smoke)
    exec python -m optrush bench model.preset=debug train.device=cpu train.micro_batch_size=2 data.max_length=64 \
      objective=causal_lm train.max_steps=1000 output_dir=/tmp/optrush-ladder-smoke --synthetic --warmup 1 \
      --steps 2 --ladder benchmarks/ladders/qlora_8b.yaml --out /tmp/optrush-ladder-smoke --peers hf_default ;;
  *) echo "unknown ladder '$what': use 1b, qlora8b or --smoke" >&2; exit 2 ;;
esac

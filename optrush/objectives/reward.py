"""Reward models: a scalar head on the decoder, trained with the pairwise Bradley-Terry loss (`objective=reward`).

    model = apply_reward_head(model, pad_token_id=tok.pad_token_id)   # model.output becomes Linear(dim, 1)
    objective = RewardModel(margin=0.0)
    loss_sum, _ = objective(model, pairs)             # pairs: optrush.data.preference.PairBatch
    scores = score_texts(load_reward_model("runs/rm/final"), tokenizer, ["Recipe: ...", ...])

The reward of a sequence is the head's output at its last token, the EOS (the preference encoding keeps the EOS
as an input, see `optrush.data.preference`), which has attended to the whole prompt and completion. The loss of
a pair is -log sigmoid(r_chosen - r_rejected - margin) (Bradley & Terry 1952; InstructGPT,
https://arxiv.org/abs/2203.02155; the margin as in Llama 2, https://arxiv.org/abs/2307.09288, section 3.2.2),
summed over pairs: the loop divides by the step's pair count. Metrics: ranking accuracy and the mean reward gap.

Saved (optrush.models.io.save_model) as transformers' one-label `<Family>ForSequenceClassification`, head
`score.weight`, so `AutoModelForSequenceClassification.from_pretrained("runs/rm/final")` gives the same scores as
`optrush score` on `[bos] + text + [eos]` rows, right-padded with the tokenizer's pad token (transformers reads the
last token that is not `pad_token_id`; the pad token must differ from EOS, which `load_tokenizer` ensures).
`load_reward_model` also reads the older layout (a causal-LM config whose lm_head is (1, dim)), and the PEFT
adapter of a LoRA/DoRA/QLoRA reward run: a SEQ_CLS adapter holding the trained head (optrush.peft.export), loaded
over the base its adapter_config.json names.
"""
from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from optrush.data.preference import PairBatch
from optrush.objectives.dpo import pair_forward
from optrush.models.hf import args_from_hf_config, is_reward_config
from optrush.models.io import checkpoint_dtype, load_model, load_weights, read_config
from optrush.models.llama import Transformer
from optrush.peft.export import ADAPTER_CONFIG, adapter_directory, base_quantization, is_reward_adapter, \
    load_adapter
from optrush.peft.lora import merge_lora_unless_quantized


def apply_reward_head(model: Transformer, *, pad_token_id: int | None = None) -> Transformer:
    """Replace the LM head by a bias-free Linear(dim, 1) (a tied head is untied: the embedding stays).
    `pad_token_id` (the tokenizer's) goes into the saved config, where transformers finds each row's last token."""
    old = model.output.weight
    head = nn.Linear(model.args.dim, 1, bias=False, device=old.device, dtype=old.dtype)
    if old.device.type != "meta":
        nn.init.normal_(head.weight, std=model.args.dim ** -0.5)  # unit-scale rewards at init
    model.output = head
    model.args.tie_embeddings = False  # so saving keeps the head and loading does not re-tie it
    if pad_token_id is not None:
        model.args.pad_token_id = pad_token_id
    return model


def sequence_rewards(model: nn.Module, pairs: PairBatch) -> torch.Tensor:
    """(2P,) fp32 reward of every sequence of the micro-batch (chosen at even, rejected at odd indices)."""
    return pair_forward(model, pairs).flatten()[pairs.last_positions].float()  # the head's (B, T, 1) outputs


class RewardModel:
    """`(model, pairs) -> (summed Bradley-Terry loss, metrics)`; one unit per pair."""

    TOTALS = ("pairs", "correct", "gap")
    """The sums `pop_metrics` averages: a fixed set, so a rank that saw no pair still sums zeros over every key."""

    def __init__(self, *, margin: float = 0.0):
        self.margin = margin
        self.totals = Counter(dict.fromkeys(self.TOTALS, 0))

    def units(self, pairs: PairBatch) -> int:
        return pairs.num_pairs

    def __call__(self, model: nn.Module, pairs: PairBatch) -> tuple[torch.Tensor, dict[str, float]]:
        rewards = sequence_rewards(model, pairs)
        gap = rewards[0::2] - rewards[1::2]
        loss_sum = -F.logsigmoid(gap - self.margin).sum()
        correct, gap_sum = float((gap > 0).sum()), float(gap.detach().sum())
        self.totals.update(pairs=pairs.num_pairs, correct=correct, gap=gap_sum)
        return loss_sum, {"accuracy": correct / pairs.num_pairs, "reward_gap": gap_sum / pairs.num_pairs}

    def pop_metrics(self, reduce: Callable[[Counter], Mapping[str, float]] | None = None) -> dict[str, float]:
        """Accuracy and mean reward gap over the pairs seen since the last call; `reduce` (the loop's
        `sum_over_ranks`) sums the totals over all ranks first."""
        totals = reduce(self.totals) if reduce else self.totals
        self.totals = Counter(dict.fromkeys(self.TOTALS, 0))
        if not totals["pairs"]:
            return {}
        return {"accuracy": totals["correct"] / totals["pairs"], "reward_gap": totals["gap"] / totals["pairs"]}

    def state_dict(self) -> dict:
        """Nothing to keep across a resume (see optrush.objectives)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def load_reward_model(path: str | Path, *, base: str | Path | None = None,
                      device: torch.device | str = "cpu") -> Transformer:
    """A reward model saved by an `objective=reward` run, in fp32: a ForSequenceClassification checkpoint (or the
    older layout whose lm_head is (1, dim)), or the PEFT adapter of a run with LoRA/DoRA/QLoRA (an adapter
    directory, or a final/ or checkpoint directory that holds only adapter/) over the base it names, merged into
    it unless that base is quantized (`base` replaces the base the adapter names)."""
    path = Path(path)
    adapter = adapter_directory(path)
    if adapter is None:
        return load_reward_checkpoint(path, dtype=torch.float32, device=device).eval()
    model = load_reward_adapter(adapter, base=base, dtype=torch.float32, device=device)
    return merge_lora_unless_quantized(model).eval()


def load_reward_checkpoint(path: Path, *, dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
                           quantize: str = "none") -> Transformer:
    """The reward model in checkpoint directory `path`; `dtype` defaults to the checkpoint's. `quantize` (nf4,
    int8) as in `load_model`."""
    cfg = read_config(path)
    with torch.device("meta"):
        model = apply_reward_head(Transformer(args_from_hf_config(cfg)))
    try:
        return load_weights(model, path, dtype=dtype or checkpoint_dtype(cfg, path), device=torch.device(device),
                            quantize=quantize)
    except ValueError as error:
        raise ValueError(f"{error}; is {path} the final/ directory of an objective=reward run?") from None


def load_reward_adapter(adapter: Path, *, base: str | Path | None = None, dtype: torch.dtype | None = None,
                        device: torch.device | str = "cpu") -> Transformer:
    """The base of reward adapter directory `adapter` (`base`, else the one its config names), quantized as
    `base_quantization` says, with the adapter and its trained head applied (not merged). A base that is a
    language model gets a reward head first, which the adapter's replaces; `dtype` defaults to the base
    checkpoint's."""
    config_file = adapter / ADAPTER_CONFIG
    config = json.loads(config_file.read_text())
    if not is_reward_adapter(adapter):
        raise ValueError(f"{config_file}: this adapter holds no reward head (task_type {config.get('task_type')}, "
                         f"modules_to_save {config.get('modules_to_save')}): it adapts a language model (generate "
                         "with it, or evaluate it with optrush eval), or an optrush that saved reward adapters as "
                         "CAUSAL_LM without their head wrote it (that head never trained: train the reward model "
                         "again)")
    base = base or config.get("base_model_name_or_path")
    if base is None:
        raise ValueError(f"{config_file} names no base model: pass its base model directory (optrush export "
                         "--base DIR)")
    base = Path(base)
    quantize = base_quantization(adapter, base)
    if is_reward_config(read_config(base)):  # a preset run's base/, saved with its initial head
        model = load_reward_checkpoint(base, dtype=dtype, device=device, quantize=quantize)
    else:
        model = apply_reward_head(load_model(base, dtype=dtype, device=device, quantize=quantize))
    return load_adapter(model, adapter)


@torch.no_grad()
def score_texts(model: nn.Module, tokenizer, texts: list[str], *, prompts: list[str] | None = None,
                where: list[str] | None = None, batch_size: int = 16) -> list[float]:
    """The reward of each text (with `prompts`: of each prompt + text), encoded as training encodes a pair's side
    (`encode_sequence`: `[bos] + prompt + text + [eos]`, prompt and text tokenized apart) and read at the EOS
    (right-padded rows). A text longer than the model's max_seq_len is a ValueError naming it (`where`, e.g.
    file:line, else its index)."""
    from optrush.data.formats import special_ids
    from optrush.data.preference import encode_sequence

    bos_id, eos_id = special_ids(tokenizer)
    device = next(model.parameters()).device
    prompts = [""] * len(texts) if prompts is None else prompts
    scores: list[float] = []
    for start in range(0, len(texts), batch_size):
        prompt_ids, text_ids = (tokenizer(items[start:start + batch_size], add_special_tokens=False)["input_ids"]
                                for items in (prompts, texts))
        chunk = [encode_sequence(p, t, bos_id=bos_id, eos_id=eos_id).input_ids for p, t in zip(prompt_ids, text_ids)]
        for index, ids in enumerate(chunk, start):
            if len(ids) > model.args.max_seq_len:
                name = where[index] if where else f"text {index}"
                raise ValueError(f"{name}: {len(ids)} tokens, longer than the reward model's max_seq_len="
                                 f"{model.args.max_seq_len}: shorten it")
        width = max(len(ids) for ids in chunk)
        input_ids = torch.tensor([ids + [tokenizer.pad_token_id] * (width - len(ids)) for ids in chunk], device=device)
        last = torch.tensor([len(ids) - 1 for ids in chunk], device=device)
        out = model(input_ids)[:, :, 0]  # causal attention: right padding never reaches the real tokens
        scores += out[torch.arange(len(chunk), device=device), last].float().tolist()
    return scores

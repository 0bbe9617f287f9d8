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
`load_reward_model` also reads the older layout (a causal-LM config whose lm_head is (1, dim)).
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from optrush.data.preference import PairBatch
from optrush.objectives.dpo import pair_forward
from optrush.models.hf import args_from_hf_config, from_hf_key
from optrush.models.io import read_config, weight_files
from optrush.models.llama import Transformer


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

    def __init__(self, *, margin: float = 0.0):
        self.margin = margin
        self.totals: Counter = Counter()

    def units(self, pairs: PairBatch) -> int:
        return pairs.num_pairs

    def __call__(self, model: nn.Module, pairs: PairBatch) -> tuple[torch.Tensor, dict[str, float]]:
        rewards = sequence_rewards(model, pairs)
        gap = rewards[0::2] - rewards[1::2]
        loss_sum = -F.logsigmoid(gap - self.margin).sum()
        correct, gap_sum = float((gap > 0).sum()), float(gap.detach().sum())
        self.totals.update(pairs=pairs.num_pairs, correct=correct, gap=gap_sum)
        return loss_sum, {"accuracy": correct / pairs.num_pairs, "reward_gap": gap_sum / pairs.num_pairs}

    def pop_metrics(self) -> dict[str, float]:
        """Accuracy and mean reward gap over the pairs seen since the last call."""
        totals, self.totals = self.totals, Counter()
        if not totals["pairs"]:
            return {}
        return {"accuracy": totals["correct"] / totals["pairs"], "reward_gap": totals["gap"] / totals["pairs"]}

    def state_dict(self) -> dict:
        """Nothing to keep across a resume (see optrush.objectives)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def load_reward_model(path: str | Path, *, device: torch.device | str = "cpu") -> Transformer:
    """A reward model saved by an `objective=reward` run (a ForSequenceClassification checkpoint, or the older
    layout whose lm_head is (1, dim)), in fp32."""
    path = Path(path)
    args = args_from_hf_config(read_config(path))
    with torch.device("meta"):
        model = apply_reward_head(Transformer(args))
    params = dict(model.named_parameters())
    seen = set()
    for file in weight_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():
                name = from_hf_key(key)
                tensor = f.get_tensor(key)
                if name not in params or tensor.shape != params[name].shape:
                    raise ValueError(f"{file}: tensor {key!r} {tuple(tensor.shape)} does not fit a reward model "
                                     f"of {path / 'config.json'}; is this the final/ directory of an "
                                     "objective=reward run?")
                module_name, _, leaf = name.rpartition(".")
                setattr(model.get_submodule(module_name), leaf,
                        nn.Parameter(tensor.to(device=device, dtype=torch.float32, copy=True)))
                seen.add(name)
    missing = sorted(set(params) - seen)
    if missing:
        raise ValueError(f"{path}: the checkpoint lacks {missing[:4]}; is it a reward model checkpoint?")
    model.init_rope(device)
    return model.eval()


@torch.no_grad()
def score_texts(model: nn.Module, tokenizer, texts: list[str], *, batch_size: int = 16) -> list[float]:
    """The reward of each text, encoded as `[bos] + text + [eos]` and read at the EOS (right-padded rows)."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    device = next(model.parameters()).device
    scores: list[float] = []
    for start in range(0, len(texts), batch_size):
        chunk = [bos + ids + [tokenizer.eos_token_id]
                 for ids in tokenizer(texts[start:start + batch_size], add_special_tokens=False)["input_ids"]]
        width = max(len(ids) for ids in chunk)
        input_ids = torch.tensor([ids + [tokenizer.pad_token_id] * (width - len(ids)) for ids in chunk], device=device)
        last = torch.tensor([len(ids) - 1 for ids in chunk], device=device)
        out = model(input_ids)[:, :, 0]  # causal attention: right padding never reaches the real tokens
        scores += out[torch.arange(len(chunk), device=device), last].float().tolist()
    return scores

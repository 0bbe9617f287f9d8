"""GRPO: rewards and advantages, mean reward rises on a toy task, and `optrush train objective=grpo` runs on CPU."""
import copy
import math

import pytest
import torch

from optrush.config import load_config
from optrush.config.schema import GRPOConfig
from optrush.data.formats import build_example
from optrush.data.pack import collate
from optrush.data.tokenizer import load_tokenizer
from optrush.models.io import build_model
from optrush.models.presets import get_preset
from optrush.objectives.grpo import GRPO, group_advantages, import_reward, prompts_of, recipe_format_reward


def vowel_share(prompts, completions):
    """Toy reward: the share of vowels among the completion's characters."""
    return [sum(ch in "aeiou" for ch in c) / max(len(c), 1) for c in completions]


def test_recipe_format_reward_and_import():
    good = "Ingredients:\n- 1 egg\nDirections:\n1. Boil the egg."
    assert recipe_format_reward(["Recipe: Egg\n"] * 3, [good, "Directions:\n1. Boil.", "nothing"]) == [1.0, 0.25, 0.0]
    assert import_reward("optrush.objectives.grpo:recipe_format_reward") is recipe_format_reward
    with pytest.raises(ValueError, match="grpo.rewards"):
        import_reward("optrush.objectives.grpo:no_such_function")


def test_group_advantages_are_normalised_per_group():
    adv = group_advantages(torch.tensor([1.0, 3.0, 5.0, 5.0, 0.0, 2.0]), 3)
    assert adv[:3].tolist() == pytest.approx([-1.0, 0.0, 1.0], abs=1e-3)
    assert float(adv[3:].mean()) == pytest.approx(0.0, abs=1e-6)


def test_grpo_raises_the_mean_reward_on_a_toy_task(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    model = build_model(get_preset("debug", vocab_size=len(tok)), seed=0)
    reference = copy.deepcopy(model).requires_grad_(False)
    objective = GRPO(cfg=GRPOConfig(group_size=8, max_new_tokens=6, kl_beta=0.01), tokenizer=tok,
                     reference=reference, seed=0, rewards=[vowel_share])
    examples = [build_example(tok.encode(f"Recipe: {title}\n", add_special_tokens=False), [10],
                              bos_id=tok.bos_token_id, eos_id=tok.eos_token_id) for title in ("Bread", "Soup")]
    batch = collate([[e] for e in examples], packed=False, pad_id=tok.pad_token_id, max_length=64)
    assert prompts_of(batch)[0] == examples[0].input_ids[:-1]  # the completion token is not part of the prompt
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2)
    rewards = []
    for _ in range(10):
        loss_sum, metrics = objective(model, batch)
        (loss_sum / objective.units(batch)).backward()
        optimizer.step()
        optimizer.zero_grad()
        rewards.append(metrics["reward"])
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.1, rewards
    assert objective.pop_metrics()["kl"] > 0


def test_grpo_trains_end_to_end_on_cpu(debug_overrides):
    from optrush.train import train

    cfg = load_config(None, [*debug_overrides, "objective=grpo", "data.packing=none", "grpo.group_size=2",
                             "grpo.max_new_tokens=4", "train.max_steps=2", "train.lr=1e-3"])
    summary = train(cfg)
    assert summary["steps"] == 2 and all(math.isfinite(loss) for loss in summary["losses"])

"""GRPO: rewards and advantages, mean reward rises on a toy task, several updates per generation make the clip bind,
a resumed objective continues exactly, and `optrush train objective=grpo` runs on CPU."""
import copy
import json
import math
from pathlib import Path

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


@pytest.fixture
def toy(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    examples = [build_example(tok.encode(f"Recipe: {title}\n", add_special_tokens=False), [10],
                              bos_id=tok.bos_token_id, eos_id=tok.eos_token_id) for title in ("Bread", "Soup", "Pie")]
    batches = [collate([[e] for e in pair], packed=False, pad_id=tok.pad_token_id, max_length=64)
               for pair in (examples[:2], examples[1:])]
    return tok, batches


def grpo_run(tok, batches, *, steps, model=None, optimizer=None, objective=None):
    """`steps` optimizer steps of two micro-batches each over `batches`; returns the state and the losses."""
    if model is None:
        model = build_model(get_preset("debug", vocab_size=len(tok)), seed=0)
        optimizer = torch.optim.AdamW(model.parameters(), lr=2e-2)
        objective = GRPO(cfg=GRPOConfig(group_size=4, max_new_tokens=5, kl_beta=0.0, updates_per_generation=2),
                         tokenizer=tok, reference=None, seed=0, micro_batches=2, rewards=[vowel_share])
    losses = []
    for _ in range(steps):
        units = sum(objective.units(b) for b in batches)
        for batch in batches:
            loss_sum, _ = objective(model, batch)
            (loss_sum / units).backward()
            losses.append(float(loss_sum.detach()))
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer, objective, losses


def test_second_update_reuses_the_rollouts_and_the_clip_binds(toy):
    tok, batches = toy
    model, optimizer, objective, _ = grpo_run(tok, batches, steps=1)
    first = [r.batch.input_ids.clone() for r in objective.rollouts]
    generator = objective.generator.get_state()
    assert objective.pop_metrics()["clip_fraction"] == 0.0  # sampling policy == trained policy: ratio exactly 1
    grpo_run(tok, batches, steps=1, model=model, optimizer=optimizer, objective=objective)
    assert all(torch.equal(a, r.batch.input_ids) for a, r in zip(first, objective.rollouts))
    assert torch.equal(objective.generator.get_state(), generator)  # nothing sampled on the second update
    assert objective.pop_metrics()["clip_fraction"] > 0  # the step moved the ratio past 1 +- clip_eps somewhere
    grpo_run(tok, batches, steps=1, model=model, optimizer=optimizer, objective=objective)
    assert not torch.equal(objective.generator.get_state(), generator)  # the third step generates anew


def test_resume_mid_generation_equals_uninterrupted(toy, tmp_path):
    tok, batches = toy
    uninterrupted, _, _, straight = grpo_run(tok, batches, steps=4)
    model, optimizer, objective, losses = grpo_run(tok, batches, steps=3)  # stops between the 2 updates of a rollout
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "objective": objective.state_dict()}, tmp_path / "state.pt")
    saved = torch.load(tmp_path / "state.pt", weights_only=False)
    model, optimizer, objective, _ = grpo_run(tok, batches, steps=0)
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    objective.load_state_dict(saved["objective"])
    resumed, _, _, rest = grpo_run(tok, batches, steps=1, model=model, optimizer=optimizer, objective=objective)
    assert losses + rest == straight
    assert all(torch.equal(a, b) for a, b in zip(resumed.parameters(), uninterrupted.parameters()))


def test_grpo_trains_end_to_end_on_cpu(debug_overrides, capsys):
    from optrush.train import train

    cfg = load_config(None, [*debug_overrides, "objective=grpo", "data.packing=none", "grpo.group_size=2",
                             "grpo.max_new_tokens=4", "train.max_steps=2", "train.lr=1e-3"])
    summary = train(cfg)
    assert summary["steps"] == 2 and all(math.isfinite(loss) for loss in summary["losses"])
    # the data report's "trained" share counts the data's completions, which GRPO replaces with its samples
    assert "objective=grpo uses the prompts only: it samples grpo.group_size=2 completions" in capsys.readouterr().out


def test_grpo_with_lora_disabled_reference_and_reused_rollouts_trains(debug_overrides):
    from optrush.train import train

    cfg = load_config(None, [*debug_overrides, "objective=grpo", "data.packing=none", "grpo.group_size=2",
                             "grpo.max_new_tokens=4", "train.max_steps=2", "train.lr=1e-2", "peft.method=lora",
                             "peft.r=4", "grpo.reference=lora_disabled", "grpo.updates_per_generation=2",
                             "train.grad_accum=2", "train.micro_batch_size=1",
                             "grpo.rewards=[test_objectives_grpo:vowel_share]"])
    summary = train(cfg)
    assert summary["steps"] == 2 and all(math.isfinite(loss) for loss in summary["losses"])
    logged = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert logged[1]["grad_norm"] > 0 and logged[1]["clip_fraction"] >= 0
    with pytest.raises(Exception, match="grpo.reference=lora_disabled"):
        load_config(None, [*debug_overrides, "objective=grpo", "data.packing=none", "grpo.reference=lora_disabled"])


def test_fused_loss_log_probs_equal_full_logits(toy):
    """chunk_tokens (kernels.fused_loss=true): the same loss, KL and gradients, policy and reference chunked."""
    tok, batches = toy
    results = []
    for chunk_tokens in (None, 5):
        model = build_model(get_preset("debug", vocab_size=len(tok)), seed=0)
        reference = build_model(get_preset("debug", vocab_size=len(tok)), seed=1).requires_grad_(False)
        objective = GRPO(cfg=GRPOConfig(group_size=4, max_new_tokens=5, kl_beta=0.1), tokenizer=tok,
                         reference=reference, seed=0, rewards=[vowel_share], chunk_tokens=chunk_tokens)
        loss_sum, metrics = objective(model, batches[0])
        loss_sum.backward()
        results.append((loss_sum.detach(), metrics["kl"], [p.grad for p in model.parameters()]))
    (loss, kl, grads), (chunked_loss, chunked_kl, chunked_grads) = results
    assert kl > 0.01 and objective.rollouts[0].batch.input_ids.numel() % 5  # a real KL; a ragged last chunk
    torch.testing.assert_close(chunked_loss, loss, atol=1e-6, rtol=1e-5)
    assert chunked_kl == pytest.approx(kl, rel=1e-5)
    for chunked, full in zip(chunked_grads, grads):
        torch.testing.assert_close(chunked, full, atol=1e-6, rtol=1e-4)


def returns_scalar(prompts, completions):
    return 1.0


def returns_one_too_few(prompts, completions):
    return [0.5] * (len(completions) - 1)


def returns_none(prompts, completions):
    return None


def returns_strings(prompts, completions):
    return ["good"] * len(completions)


def returns_nan(prompts, completions):
    return [float("nan")] * len(completions)


def raises(prompts, completions):
    raise KeyError("score")


@pytest.mark.parametrize("fn, problem", [(returns_scalar, "not a list"), (returns_none, "not a list"),
                                         (returns_one_too_few, "3 value"), (returns_strings, "not a number"),
                                         (returns_nan, "not finite")])
def test_reward_function_results_are_checked(toy, fn, problem):
    tok, batches = toy
    model = build_model(get_preset("debug", vocab_size=len(tok)), seed=0).eval()
    objective = GRPO(cfg=GRPOConfig(group_size=2, max_new_tokens=2, kl_beta=0.0), tokenizer=tok, reference=None,
                     rewards=[vowel_share, fn])
    with pytest.raises(ValueError, match=f"'test_objectives_grpo:{fn.__name__}' returned .*{problem}.*2 prompts "
                                         r"x grpo.group_size=2\), and must return a list of 4 finite floats"):
        objective(model, batches[0])


def test_reward_function_exception_names_the_function(toy):
    tok, batches = toy
    model = build_model(get_preset("debug", vocab_size=len(tok)), seed=0).eval()
    objective = GRPO(cfg=GRPOConfig(group_size=2, max_new_tokens=2, kl_beta=0.0), tokenizer=tok, reference=None,
                     rewards=[raises])
    with pytest.raises(KeyError) as caught:
        objective(model, batches[0])
    assert "reward function 'test_objectives_grpo:raises' of grpo.rewards" in "".join(caught.value.__notes__)


def test_reward_import_from_a_file_and_the_pythonpath_hint(tmp_path, monkeypatch):
    (tmp_path / "myrewards.py").write_text("def length(prompts, completions):\n"
                                           "    return [float(len(c)) for c in completions]\n")
    monkeypatch.chdir(tmp_path)
    for name in ("myrewards.py:length", f"{tmp_path / 'myrewards.py'}:length"):
        assert import_reward(name)(["p"], ["abc"]) == [3.0]
    with pytest.raises(ValueError, match=r"PYTHONPATH=.*grpo.rewards=\[path/to/myrewards.py:length\]"):
        import_reward("myrewards:length")  # the working directory is not on the path
    with pytest.raises(ValueError, match="does not exist .*working directory"):
        import_reward("absent.py:length")

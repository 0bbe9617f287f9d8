"""Start-up checks found by a user walkthrough: a grpo.rewards entry whose file has a syntax error or a failing import,
a wrong signature, a misspelt name or a non-callable is a ConfigError before any data is read; optimizer and GRPO
values out of range are refused when the config loads, one line per key; train.eval_every without eval data is an
error."""
import re

import pytest

from optrush.config import ConfigError, load_config
from optrush.objectives.grpo import import_reward
from optrush.train import train


def train_with_reward(debug_overrides, reward: str):
    train(load_config(None, [*debug_overrides, "objective=grpo", "data.packing=none", f"grpo.rewards=[{reward}]"]))


@pytest.fixture
def reward_file(tmp_path, monkeypatch):
    """Writes a reward module under tmp_path (also on the Python path) and names it as a file or as a module."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(stem: str, source: str, *, form: str = "file") -> str:
        path = tmp_path / f"{stem}.py"
        path.write_text(source)
        return f"{path}:f" if form == "file" else f"{stem}:f"
    return write


@pytest.mark.parametrize("form", ["file", "module"])
def test_a_syntax_error_in_the_reward_code_is_a_config_error_at_its_line(debug_overrides, data_never_read,
                                                                         reward_file, form):
    reward = reward_file(f"syntax_{form}", "import math\ndef f(prompts, completions)\n    return [0.0]\n", form=form)
    with pytest.raises(ConfigError, match=rf"^grpo.rewards: \S*syntax_{form}.py:2: syntax error in "
                                          r"`def f\(prompts, completions\)` \(expected ':'\).*fix the syntax there"):
        train_with_reward(debug_overrides, reward)


@pytest.mark.parametrize("form", ["file", "module"])
def test_a_failing_import_in_the_reward_code_is_a_config_error_at_its_line(debug_overrides, data_never_read,
                                                                           reward_file, form):
    reward = reward_file(f"imports_{form}", "import math\nimport no_such_package_xyz\ndef f(p, c):\n    return []\n",
                         form=form)
    with pytest.raises(ConfigError, match=rf"^grpo.rewards: \S*imports_{form}.py:2: `import no_such_package_xyz` "
                                          r"failed \(ModuleNotFoundError: No module named 'no_such_package_xyz'\)"
                                          r".*install the package that provides it"):
        train_with_reward(debug_overrides, reward)


def test_an_error_raised_by_the_reward_code_at_import_names_grpo_rewards(reward_file):
    reward = reward_file("raises_at_import", "raise RuntimeError('no model file')\n")
    with pytest.raises(RuntimeError, match="no model file") as caught:
        import_reward(reward)
    assert f"while importing the reward function {reward!r} of grpo.rewards" in "".join(caught.value.__notes__)


def test_a_reward_function_of_the_wrong_signature_fails_before_the_data_is_read(debug_overrides, data_never_read,
                                                                                reward_file):
    reward = reward_file("one_arg", "def f(completions):\n    return [0.0] * len(completions)\n")
    with pytest.raises(ConfigError, match=r"^grpo.rewards: '\S*one_arg.py:f' \(\S*one_arg.py:1\) has the signature "
                                          r"\(completions\) .*define it as fn\(prompts: list\[str\], "
                                          r"completions: list\[str\]\) -> list\[float\]"):
        train_with_reward(debug_overrides, reward)


@pytest.mark.parametrize("signature", ["prompts, completions, **kwargs", "*args", "p, c, scale=1.0"])
def test_reward_signatures_that_take_two_positional_lists_are_accepted(reward_file, signature):
    reward = reward_file(f"ok_{len(signature)}", f"def f({signature}):\n    return [1.0]\n")
    assert import_reward(reward)(["p"], ["c"]) == [1.0]


def test_a_wrapped_reward_function_is_checked_through_its_wrapper(reward_file):
    reward = reward_file("cached", "import functools\n@functools.lru_cache\ndef f(completions):\n    return 0\n")
    with pytest.raises(ConfigError, match=r"cached.py:2\) has the signature \(completions\)"):
        import_reward(reward)


def test_a_misspelt_reward_function_gets_a_suggestion(reward_file):
    reward = reward_file("spelling", "def length_reward(prompts, completions):\n    return [0.0]\n")
    with pytest.raises(ConfigError, match=r"has no function 'lenght_reward' .*Did you mean 'length_reward'\?"):
        import_reward(reward.replace(":f", ":lenght_reward"))


def test_a_reward_name_that_is_not_callable_says_so(reward_file):
    reward = reward_file("constant", "NOT_CALLABLE = 3\n")
    with pytest.raises(ConfigError, match=r"constant.py has 'NOT_CALLABLE', but it is 3 \(int\), not a function .*"
                                          r"name a function fn\(prompts"):
        import_reward(reward.replace(":f", ":NOT_CALLABLE"))


def problem_lines(overrides: list[str]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(None, overrides)
    return [line for line in str(caught.value).splitlines() if line.startswith("  - ")]


@pytest.mark.parametrize("override, message", [
    ("optim.eps=-1", r"optim.eps=-1.0: must be > 0"),
    ("optim.eps=0", r"optim.eps=0.0: must be > 0"),
    ("optim.betas=[0.9,1.0]", r"optim.betas=\[0.9, 1.0\]: each must be in \[0, 1\)"),
    ("optim.momentum=-0.1", r"optim.momentum=-0.1: must be in \[0, 1\)"),
    ("optim.weight_decay=-0.1", r"optim.weight_decay=-0.1: must be >= 0"),
])
def test_optimizer_values_out_of_range_are_refused_when_the_config_loads(debug_overrides, override, message):
    lines = problem_lines([*debug_overrides, override])
    assert len(lines) == 1 and re.search(message, lines[0]), lines


def test_each_grpo_value_out_of_range_is_its_own_problem_naming_its_value(debug_overrides):
    lines = problem_lines([*debug_overrides, "objective=grpo", "data.packing=none", "grpo.max_new_tokens=0",
                           "grpo.temperature=0", "grpo.clip_eps=-1", "grpo.kl_beta=-0.5"])
    expected = [r"grpo.max_new_tokens=0: must be >= 1", r"grpo.temperature=0.0: must be > 0",
                r"grpo.clip_eps=-1.0: must be > 0", r"grpo.kl_beta=-0.5: must be >= 0"]
    assert len(lines) == len(expected) and all(re.search(e, line) for e, line in zip(expected, lines)), lines
    assert len(problem_lines([*debug_overrides, "objective=grpo", "data.packing=none", "grpo.temperature=0"])) == 1


def test_eval_every_without_eval_data_is_a_config_error(debug_overrides, recipe_corpus):
    lines = problem_lines([*debug_overrides, "train.eval_every=2"])
    assert len(lines) == 1 and re.search(r"train.eval_every=2 evaluates on held-out data, and there is none: set "
                                         r"data.eval_path .* or data.eval_fraction", lines[0]), lines
    for eval_data in ("data.eval_fraction=0.1", f"data.eval_path={recipe_corpus[0]}"):
        assert load_config(None, [*debug_overrides, "train.eval_every=2", eval_data]).train.eval_every == 2

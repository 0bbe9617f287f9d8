"""The README stays true: every config key is documented, and the demo command runs end to end (short)."""
import re
from pathlib import Path

from optrush.config.load import all_keys
from optrush.config.schema import Config

ROOT = Path(__file__).resolve().parents[1]


def test_every_config_key_is_in_the_reference_table():
    readme = (ROOT / "README.md").read_text()
    documented = set(re.findall(r"`([a-z_]+(?:\.[a-z_0-9]+)*)`", readme))
    missing = [k for k in all_keys(Config) if k not in documented]
    assert not missing, f"README.md's configuration reference lacks: {missing}"


def test_readme_set_up_commands_are_marked_for_ci():
    readme = (ROOT / "README.md").read_text()
    assert "<!-- demo-command -->" in readme and "<!-- test-command -->" in readme
    assert "optrush demo" in readme and "pytest" in readme


def test_demo_runs_end_to_end_quickly(tmp_path, capsys):
    from optrush.cli.main import main

    assert main(["demo", "--out", str(tmp_path / "demo"), "--steps", "8", "--records", "600"]) == 0
    out = capsys.readouterr().out
    assert "two sampled recipes" in out and "from_pretrained" in out and "demo finished" in out
    assert (tmp_path / "demo" / "run" / "final" / "config.json").is_file()


def test_readme_python_imports_resolve():
    """Every `from X import Y` of the README's Python examples names something that exists."""
    import importlib

    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    imports = [m for block in blocks for m in re.findall(r"^from ([\w.]+) import ([\w, ]+)$", block, flags=re.M)]
    assert imports
    for module, names in imports:
        for name in (n.strip() for n in names.split(",")):
            assert hasattr(importlib.import_module(module), name), f"README: from {module} import {name}"
    assert not re.search(r"\boptrush\.[a-z_]+\(", "\n".join(blocks)), "README calls a top-level optrush function"

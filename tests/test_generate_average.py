"""Checkpoint averaging equals the arithmetic mean of the weights; mismatched checkpoints are refused."""
import pytest
import torch

from optrush.cli.main import main
from optrush.models import build_model, load_model, save_model
from optrush.models.average import average_checkpoints
from optrush.models.llama import ModelArgs

ARGS = dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64)


def test_average_is_the_mean(tmp_path):
    models = [build_model(ModelArgs(**ARGS), seed=s) for s in range(3)]
    for i, m in enumerate(models):
        save_model(m, tmp_path / f"c{i}")
    (tmp_path / "c0" / "tokenizer.json").write_text("{}")
    assert main(["average", *(str(tmp_path / f"c{i}") for i in range(3)), "--out", str(tmp_path / "avg")]) == 0
    averaged = dict(load_model(tmp_path / "avg").named_parameters())
    for name, p in models[0].named_parameters():
        expected = sum(dict(m.named_parameters())[name] for m in models) / 3
        torch.testing.assert_close(averaged[name], expected, atol=1e-6, rtol=1e-6)
    assert (tmp_path / "avg" / "tokenizer.json").is_file()


def test_mismatched_checkpoints_are_refused(tmp_path):
    save_model(build_model(ModelArgs(**ARGS), seed=0), tmp_path / "a")
    save_model(build_model(ModelArgs(**{**ARGS, "n_layers": 3}), seed=0), tmp_path / "b")
    with pytest.raises(ValueError, match="num_hidden_layers"):
        average_checkpoints([tmp_path / "a", tmp_path / "b"], out=tmp_path / "avg")

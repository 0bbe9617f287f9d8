"""Shared fixtures: a tiny recipe corpus and a BPE tokenizer trained on it, built once per test session, offline."""
import importlib.util
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def load_benchmark(name: str):
    """The module of `benchmarks/<name>.py` (scripts, not a package), for tests of their pure functions."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def lift_float8_device_check(monkeypatch) -> None:
    """torch's CPU `_scaled_mm` runs float8 matmuls (emulated, slowly): enough to run the training loop's float8
    path in a CPU test. Users are refused on CPU (`require_float8`: no speed to gain there); tests lift that."""
    import torch

    pytest.importorskip("torchao.float8")
    one = torch.ones(16, 16, dtype=torch.float8_e4m3fn)
    try:
        torch._scaled_mm(one, one.t(), scale_a=torch.tensor(1.0), scale_b=torch.tensor(1.0), out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError) as err:
        pytest.skip(f"this torch has no CPU float8 matmul: {err}")
    from optrush.bench import run
    from optrush.train import float8, loop
    for module in (float8, loop, run):
        monkeypatch.setattr(module, "require_float8", lambda device, mode: None)


def saved_tensor_bytes(run, *, kept=()) -> int:
    """Bytes of the distinct storages autograd saves for backward while `run()` runs, leaving out those of `kept`
    (weights and buffers, which exist anyway); a tensor saved by several ops (one input of q, k and v) counts once."""
    import torch

    kept_storages = {t.untyped_storage().data_ptr() for t in kept}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in kept_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(saved.values())


@pytest.fixture(scope="session")
def recipe_corpus(tmp_path_factory):
    """(path to a cleaned recipe JSONL of a few hundred records, the records)."""
    from optrush.data.clean import clean_records
    from optrush.data.recipes import generate_recipes, write_jsonl

    kept, _ = clean_records(list(generate_recipes(400, seed=1)))
    path = tmp_path_factory.mktemp("data") / "recipes.jsonl"
    write_jsonl(kept, path)
    return path, kept


@pytest.fixture(scope="session")
def tokenizer_dir(recipe_corpus, tmp_path_factory):
    from optrush.data.recipes import recipe_completion, recipe_prompt
    from optrush.data.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer((recipe_prompt(r) + recipe_completion(r) for r in recipe_corpus[1]), vocab_size=512, out_dir=out)
    return out


@pytest.fixture(scope="session")
def short_pairs_file(recipe_corpus, tmp_path_factory):
    """A preference JSONL of 40 recipe pairs cut short (two ingredients, two steps), so several fit a 256-token row."""
    from optrush.data.preference import recipe_preference_pairs
    from optrush.data.recipes import write_jsonl

    records = [{**r, "ingredients": r["ingredients"][:2], "directions": r["directions"][:2]}
               for r in recipe_corpus[1][:40]]
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    write_jsonl(recipe_preference_pairs(records, seed=0), path)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tokenizer_dir, tmp_path_factory):
    """(path, model, tokenizer): an HF-format `final/` folder of a tiny random model with the test tokenizer, as
    the commands that use a trained checkpoint (generate, chat, eval) read it."""
    import shutil

    from optrush.data.tokenizer import load_tokenizer
    from optrush.models import build_model, save_model
    from optrush.models.llama import ModelArgs

    tokenizer = load_tokenizer(tokenizer_dir)
    model = build_model(ModelArgs(vocab_size=len(tokenizer), dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                                  max_seq_len=256), seed=0)
    path = tmp_path_factory.mktemp("ckpt") / "final"
    save_model(model, path)
    for f in tokenizer_dir.iterdir():
        shutil.copy2(f, path / f.name)
    return path, model, tokenizer


@pytest.fixture
def debug_overrides(recipe_corpus, tokenizer_dir, tmp_path):
    """Overrides that make any recipe config a seconds-long CPU run of the `debug` model."""
    return [f"data.path={recipe_corpus[0]}", f"data.tokenizer={tokenizer_dir}", f"output_dir={tmp_path / 'run'}",
            "model.preset=debug", "objective=sft", "data.format=recipe", "data.max_length=256",
            "train.micro_batch_size=2", "train.max_steps=6", "train.lr=1e-2", "train.device=cpu",
            "logging.progress=false", "checkpoint.resume=never"]


def forbid_reading_data(monkeypatch) -> None:
    """From here on, a training run that loads its tokenizer (the start of its data work) fails the test: for the
    checks that must stop a run before any data is read."""
    def load_config_tokenizer(*args, **kwargs):
        raise AssertionError("the run read its data before stopping")

    monkeypatch.setattr("optrush.train.loop.load_config_tokenizer", load_config_tokenizer)


@pytest.fixture
def data_never_read(monkeypatch):
    forbid_reading_data(monkeypatch)

"""Write a LoRA-adapted model as a PEFT adapter or as a merged Hugging Face model, and read adapters back.

    save_adapter(model, "out/adapter", base_model_path="Llama-3.2-1B")   # adapter_config.json + adapter_model.safetensors
    export_checkpoint("runs/x/checkpoints/step_00000100", out="merged", merge=True)   # `optrush export`
    save_merged(model, "out/merged")                                     # plain HF model, adapters folded in
    save_preset_base(model, "runs/x/base", tokenizer, fingerprint=fp)    # a model.preset run's frozen base
    load_adapter(model, "out/adapter")                                   # apply_lora from the config + its weights

The adapter uses PEFT's layout, so `peft.PeftModel.from_pretrained(transformers_model, "out/adapter")` gives the
same logits as our adapted model: keys `base_model.model.<HF module>.lora_A.weight` / `.lora_B.weight` and, for
DoRA, `.lora_magnitude_vector`; a prompt-tuned model (optrush.peft.prompt) writes a PROMPT_TUNING config and
`prompt_embeddings`. A reward model's adapter (objective=reward) is a SEQ_CLS adapter that also holds the trained
scalar head, as PEFT writes `modules_to_save=["score"]`: key `base_model.model.score.weight`, so
`PeftModel.from_pretrained(<Family>ForSequenceClassification, "out/adapter")` scores as our model does. Over a
quantized base (QLoRA) the adapter is the same; the merged export dequantizes every block weight to its original
dtype (the one it was loaded in) and folds the adapters into that.

An adapter names its base model by absolute path (`base_model_name_or_path`), so it loads from any working
directory. A run that starts from `model.preset` has no base directory: the loop writes the random initial base
once (`save_preset_base`, to `<output_dir>/base/`) and names it as every adapter's `base_model_path`. Beside
the weights, `preset_base.json` records what drew them (preset, seed, quantization, the config): a later start
into the same output_dir (a resume) compares that instead of writing the base again, and refuses another base.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from optrush.config import ConfigError
from optrush.config.schema import PeftConfig
from optrush.models.hf import REWARD_HEAD_KEY, hf_config_from_args, to_hf_key
from optrush.models.io import TOKEN_ID_KEYS, has_reward_head, save_model, write_model
from optrush.peft.lora import OURS_TO_HF, apply_lora, has_lora, lora_layers, trains_reward_head
from optrush.peft.prompt import PromptEmbedding, add_prompt, prompt_embedding
from optrush.peft.quant import QuantizedLinear, QuantizedWeight

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
# our LoRALinear tensor name -> PEFT's suffix
_SUFFIX = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "lora_magnitude": "lora_magnitude_vector"}
PROMPT_KEY = "prompt_embeddings"
REWARD_HEAD_MODULE = "score"
"""The HF module of a reward model's head: what a reward adapter lists in `modules_to_save`."""
QUANTIZATION_FILE = "base_quantization.json"
PRESET_BASE_FILE = "preset_base.json"
"""In a preset run's base/: what drew its random weights (`preset_base_fingerprint`)."""


def adapter_directory(path: Path) -> Path | None:
    """Where directory `path` keeps a PEFT adapter in place of a whole model: `path` itself, or the `adapter/` of a
    LoRA run's checkpoint (or a final/ saved with peft.save=adapter), which holds no config.json; else None."""
    if (path / ADAPTER_CONFIG).is_file():
        return path
    if not (path / "config.json").is_file() and (path / "adapter" / ADAPTER_CONFIG).is_file():
        return path / "adapter"
    return None


def has_adapters(model: nn.Module) -> bool:
    """The model trains adapters (LoRA/DoRA or a soft prompt) over a frozen base: checkpoints and the final save
    write those in PEFT format instead of the whole model."""
    return has_lora(model) or prompt_embedding(model) is not None


def adapter_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """The adapter parameters of `model` under PEFT's key names."""
    prompt = prompt_embedding(model)
    if prompt is not None:
        return {PROMPT_KEY: prompt.prompt}
    params = {}
    for name, layer in lora_layers(model).items():
        hf_module = to_hf_key(f"{name}.weight").removesuffix(".weight")
        for ours, suffix in _SUFFIX.items():
            if getattr(layer, ours) is not None:
                params[f"{PREFIX}{hf_module}.{suffix}"] = getattr(layer, ours)
    if trains_reward_head(model):  # PEFT stores a module to save under its own name, without `modules_to_save.`
        params[PREFIX + REWARD_HEAD_KEY] = model.output.weight
    return params


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors of `model` under PEFT's key names, on the CPU."""
    return {key: param.detach().cpu().contiguous() for key, param in adapter_params(model).items()}


def adapter_config(model: nn.Module, *, base_model_path: str | None = None) -> dict:
    prompt = prompt_embedding(model)
    if prompt is not None:
        args = model.args
        return {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_path,
                "num_virtual_tokens": prompt.num_virtual_tokens, "token_dim": args.dim,
                "num_transformer_submodules": 1, "num_attention_heads": args.n_heads, "num_layers": args.n_layers,
                "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None, "tokenizer_name_or_path": None,
                "inference_mode": True}
    layers = list(lora_layers(model).values())
    if not layers:
        raise ValueError("the model has no LoRA adapters to export (apply_lora first, or set peft.method)")
    first = layers[0]
    targets = sorted({OURS_TO_HF[name.rpartition(".")[2]] for name in lora_layers(model)})
    reward = trains_reward_head(model)
    return {"peft_type": "LORA", "task_type": "SEQ_CLS" if reward else "CAUSAL_LM",
            "base_model_name_or_path": base_model_path,
            "r": first.r, "lora_alpha": first.alpha, "lora_dropout": first.dropout_p,
            "target_modules": targets, "use_rslora": first.rslora, "use_dora": first.lora_magnitude is not None,
            "bias": "none", "fan_in_fan_out": False, "modules_to_save": [REWARD_HEAD_MODULE] if reward else None,
            "init_lora_weights": True, "inference_mode": True}


def is_reward_adapter(adapter: Path) -> bool:
    """PEFT adapter directory `adapter` is a reward model's: its config lists the trained head in
    `modules_to_save`, as `save_adapter` writes it. The saved head decides, not the task type (a label PEFT picks
    its wrapper class by): a SEQ_CLS config without the head is refused, as no reward model can be rebuilt from it
    and it is no language model's either."""
    config_file = adapter / ADAPTER_CONFIG
    config = json.loads(config_file.read_text())
    saved = config.get("modules_to_save") or ()
    if config.get("task_type") == "SEQ_CLS" and REWARD_HEAD_MODULE not in saved:
        raise ValueError(f"{adapter}: {ADAPTER_CONFIG} says task_type SEQ_CLS (a reward model's adapter) but its "
                         f"modules_to_save {config.get('modules_to_save')} holds no {REWARD_HEAD_MODULE!r} head, "
                         "so the trained head is not in it (an optrush that left the head out of reward adapters, "
                         "or another tool, wrote it): train the reward model again, or, if it adapts a language "
                         f"model, set task_type to CAUSAL_LM in {config_file}")
    return REWARD_HEAD_MODULE in saved


def absolute(base_model_path: str | Path | None) -> str | None:
    """The base model directory as an absolute path (optrush loads bases from local directories only)."""
    return None if base_model_path is None else str(Path(base_model_path).resolve())


def save_adapter(model: nn.Module, path: str | Path, *, base_model_path: str | Path | None = None) -> Path:
    """Write `model`'s adapters to directory `path` in PEFT format; returns `path`. The base recorded is
    `base_model_path`, as an absolute path. Adapters trained over a quantized base also get
    `base_quantization.json`, so `optrush export --merge` merges them into the same dequantized base they were
    trained with (PEFT ignores the file)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = adapter_config(model, base_model_path=absolute(base_model_path))
    save_file(adapter_state(model), str(path / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (path / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    method = next((m.method for m in model.modules() if isinstance(m, QuantizedWeight)), None)
    if method is not None:
        (path / QUANTIZATION_FILE).write_text(json.dumps({"quantize": method}) + "\n")
    return path


def save_merged(model: nn.Module, path: str | Path) -> Path:
    """Write `model` with its adapters folded into the base weights (a quantized base dequantized first), as a
    plain HF model; `model` is unchanged (its layers are swapped back after the save)."""
    if prompt_embedding(model) is not None:
        raise ValueError("a prompt-tuned model has no merged form (the soft prompt is an input, not a weight): save "
                         "the adapter (save_adapter, peft.save=adapter) and load it with the base model")
    with plain_layers(model, merge=True):
        save_model(model, path)
    return Path(path)


def preset_base_fingerprint(model: nn.Module, *, preset: str, seed: int, quantize: str) -> dict:
    """What makes the random base under `model`'s adapters: the settings that drew it (build_model's init is
    reproducible from the seed) and the config.json it saves as (architecture, vocabulary, dtype, head), less the
    special-token ids, which draw no weight (a base/ saved before they were recorded still fits). Cheap for a
    sharded model too: it reads no weight."""
    config = hf_config_from_args(model.args, dtype=model.tok_embeddings.weight.dtype,
                                 reward_head=has_reward_head(model))
    fingerprint = {"model.preset": preset, "train.seed": seed, "peft.quantize": quantize,
                   **{f"config.json {key}": value for key, value in config.items() if key not in TOKEN_ID_KEYS}}
    return json.loads(json.dumps(fingerprint))  # as read back from the file: lists for tuples


def holds_preset_base(path: str | Path, fingerprint: dict) -> bool:
    """True when directory `path` holds the base `fingerprint` describes; False when it has to be written (absent,
    or written by an optrush that recorded no fingerprint). Raises ConfigError when it holds the base of another
    run, which the adapters of this one must not name."""
    path = Path(path)
    record = path / PRESET_BASE_FILE
    if not record.is_file():
        return False
    saved = json.loads(record.read_text())
    changes = [f"{key}: {saved.get(key)} -> {value}" for key, value in fingerprint.items() if saved.get(key) != value]
    if changes:
        raise ConfigError(f"{path} holds the random base of another run ({'; '.join(changes)}; see {record}): "
                          "train into another output_dir, or with the settings of the run that wrote it; to start "
                          f"this output_dir over, delete {path} together with the checkpoints/ and final/ beside it, "
                          "whose adapters name it")
    return True


def save_preset_base(model: nn.Module, path: str | Path, tokenizer=None, *, fingerprint: dict) -> Path:
    """Write the frozen base under `model`'s adapters (a quantized base dequantized, a soft prompt left out) to
    `path` as an HF model plus `tokenizer` and `fingerprint` (PRESET_BASE_FILE); returns `path`, absolute. For a
    run from model.preset, whose random base exists nowhere else; `model` is unchanged. All of it is written into
    a temporary directory renamed into place: a base/ that holds PRESET_BASE_FILE is complete."""
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):  # left by a run killed mid-write
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        with plain_layers(model, merge=False):
            write_model(model, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / PRESET_BASE_FILE).write_text(json.dumps(fingerprint, indent=2) + "\n")
        if path.exists():
            print(f"{path} has no {PRESET_BASE_FILE} (written by an older optrush): replacing it with this run's "
                  "base", flush=True)
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


@contextmanager
def plain_layers(model: nn.Module, *, merge: bool) -> Iterator[None]:
    """Swap every adapted or quantized linear for a plain nn.Linear of its merged (`merge`) or frozen base weight,
    full precision, and a soft prompt's embedding for the plain table, until the block ends."""
    adapted = lora_layers(model)
    originals = {name: layer for name, layer in model.named_modules()
                 if name in adapted or isinstance(layer, (QuantizedLinear, PromptEmbedding))}
    for name, layer in originals.items():
        if isinstance(layer, PromptEmbedding):
            _set(model, name, nn.Embedding.from_pretrained(layer.weight, freeze=True))
            continue
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        if name in adapted:
            weight = layer.merged_weight() if merge else layer.base_weight()
        else:
            weight = layer.weight.dequantize()
        linear.weight = nn.Parameter(weight, requires_grad=False)
        linear.bias = layer.bias
        _set(model, name, linear)
    try:
        yield
    finally:
        for name, layer in originals.items():
            _set(model, name, layer)


def base_quantization(adapter: Path, base: Path) -> str:
    """How to load base model directory `base` (none, nf4, int8) so that it is the base adapter directory `adapter`
    trained over: quantized as in training, except a preset run's base/, which already holds the trained-over
    weights dequantized (quantizing them again would change the double-quantized block scales)."""
    file = adapter / QUANTIZATION_FILE
    if not file.is_file() or (base / PRESET_BASE_FILE).is_file():
        return "none"
    return json.loads(file.read_text())["quantize"]


def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Apply the LoRA or soft prompt described by PEFT adapter directory `path` to `model`, load its weights."""
    path = Path(path)
    config_file = path / ADAPTER_CONFIG
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} is missing: {path} is not a PEFT adapter directory")
    c = json.loads(config_file.read_text())
    if c.get("peft_type") == "PROMPT_TUNING":
        add_prompt(model, num_virtual_tokens=c["num_virtual_tokens"], init="random")
        return load_adapter_weights(model, path)
    if c.get("peft_type") != "LORA":
        raise ValueError(f"{config_file}: peft_type {c.get('peft_type')!r} is not supported (LORA or PROMPT_TUNING)")
    targets = c["target_modules"]
    peft = PeftConfig(method="dora" if c.get("use_dora") else "lora", r=c["r"], alpha=c["lora_alpha"],
                      dropout=c.get("lora_dropout", 0.0), rslora=bool(c.get("use_rslora")),
                      target_modules="all-linear" if targets == "all-linear" else list(targets))
    if is_reward_adapter(path) and not trains_reward_head(model):
        raise ValueError(f"{config_file}: a reward model's adapter (modules_to_save {c['modules_to_save']}), and "
                         "this model has a language-model head: score texts with `optrush score "
                         f"{path}`, or load it with optrush.objectives.reward.load_reward_model")
    apply_lora(model, peft)
    return load_adapter_weights(model, path)


def load_adapter_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Copy the adapter tensors of PEFT directory `path` into `model`'s existing adapters, in place (exactly:
    resuming from a checkpoint uses this)."""
    path = Path(path)
    targets = adapter_params(model)
    saved = load_file(str(path / ADAPTER_WEIGHTS))
    missing, unexpected = set(targets) - set(saved), set(saved) - set(targets)
    if PREFIX + REWARD_HEAD_KEY in missing:
        raise ValueError(f"{path / ADAPTER_WEIGHTS} holds no reward head ({PREFIX + REWARD_HEAD_KEY}): it adapts a "
                         "language model, or was written by an optrush that left the reward head out of the "
                         "adapter (untrained); train the reward model again")
    if missing or unexpected:
        raise ValueError(f"{path / ADAPTER_WEIGHTS} does not match this model's adapters (missing "
                         f"{sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]}): check peft.* and the model")
    with torch.no_grad():
        for key, param in targets.items():
            param.copy_(saved[key])
    return model


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def export_checkpoint(ckpt: str | Path, *, out: str | Path, merge: bool, base: str | Path | None = None) -> Path:
    """`optrush export`: the adapter of `ckpt` (a LoRA checkpoint or final/ directory holding `adapter/`, or an
    adapter directory) written to `out` as a merged HF model (`merge=True`, tokenizer copied when found) or as a
    PEFT adapter. The base model is `base`, else the adapter config's `base_model_name_or_path`; a QLoRA adapter's
    base is quantized as in training (`base_quantization`) and dequantized for the merge."""
    from optrush.models.io import load_model

    ckpt, out = Path(ckpt), Path(out)
    adapter = ckpt / "adapter" if (ckpt / "adapter" / ADAPTER_CONFIG).is_file() else ckpt
    if not (adapter / ADAPTER_CONFIG).is_file():
        raise ConfigError(f"{ckpt}: no {ADAPTER_CONFIG} here or in {ckpt / 'adapter'}; give a checkpoint or final/ "
                          "directory of a run trained with peft.method=lora or dora")
    config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    base = base or config.get("base_model_name_or_path")
    if base is None:
        raise ConfigError(f"{adapter / ADAPTER_CONFIG} names no base model (the run started from model.preset): "
                          "pass --base with the base model directory")
    if not merge:
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy2(adapter / ADAPTER_WEIGHTS, out / ADAPTER_WEIGHTS)
        if (adapter / QUANTIZATION_FILE).is_file():
            shutil.copy2(adapter / QUANTIZATION_FILE, out / QUANTIZATION_FILE)
        (out / ADAPTER_CONFIG).write_text(json.dumps({**config, "base_model_name_or_path": absolute(base)},
                                                     indent=2) + "\n")
        return out
    if is_reward_adapter(adapter):
        from optrush.objectives.reward import load_reward_adapter  # the objectives import this package

        model = load_reward_adapter(adapter, base=base)
    else:
        model = load_adapter(load_model(base, quantize=base_quantization(adapter, Path(base))), adapter)
    save_merged(model, out)
    source = next((d for d in (ckpt, Path(base)) if (d / "tokenizer.json").is_file()), None)
    for name in TOKENIZER_FILES if source else ():
        if (source / name).is_file():
            shutil.copy2(source / name, out / name)
    return out


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent), leaf, module)

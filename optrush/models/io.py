"""Build, load and save models in Hugging Face format (config.json + safetensors), streaming tensor by tensor.

    model = load_model("Llama-3.2-1B", dtype=torch.bfloat16, device="cuda")   # native Transformer
    model = build_model(get_preset("debug"), dtype=torch.float32, device="cpu", seed=0)
    adopt_token_ids(model, tokenizer)           # config.json names the tokenizer's bos/eos/pad where it named none
    save_model(model, "out/final")              # transformers.AutoModelForCausalLM.from_pretrained loads it
    load_state_into(model, "out/final")         # copy weights into a live model (resume: optimizer keeps its refs)

Loading builds the model on the meta device and assigns each checkpoint tensor, converted to the target dtype
and device, as that parameter: no second full copy of the weights ever exists. A checkpoint whose architecture
the native model lacks but transformers knows loads as `HFCausalLM`, with a warning naming what is lost.
A model whose LM head was replaced by a scalar reward head saves as a one-label `ForSequenceClassification`
checkpoint (head `score.weight`); `load_model` refuses it (optrush.objectives.reward.load_reward_model reads it).
A language model also gets generation_config.json with its bos/eos/pad ids, as transformers' save_pretrained
writes it: what `GenerationConfig.from_pretrained` and serving engines read to stop at EOS.
Saving writes into a temporary directory beside the target and renames it into place, so a crash never leaves a
half-written model behind.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from optrush.models.hf import REWARD_HEAD_KEY, UnsupportedArchitecture, args_from_hf_config, from_hf_key, \
    hf_config_from_args, is_reward_config, to_hf_key
from optrush.models.hf_wrapper import UNAVAILABLE, HFCausalLM
from optrush.models.llama import ModelArgs, Transformer

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def build_model(args: ModelArgs, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                seed: int | None = None, quantize: str = "none") -> Transformer:
    """A randomly initialised model, materialised straight on `device` in `dtype`. With a seed, the init is
    reproducible and leaves the global RNG untouched. `quantize` (nf4, int8; peft.quantize) stores each block's
    linears quantized as soon as that block is initialised, so building needs memory for the quantized model plus
    one block in `dtype` (a 70B model would otherwise need its 140 GB of bf16 weights first); the result equals
    `apply_quantize` of the model built without it, bit for bit (the same random draws in the same order)."""
    device = torch.device(device)
    with torch.device("meta"):
        model = Transformer(args).to(dtype)
    with contextlib.nullcontext() if seed is None else _seeded(seed, device):
        if quantize == "none":
            model.to_empty(device=device)
            model.tie_weights()
            model.init_weights()
        else:
            _init_quantized(model, device=device, method=quantize)
    return model


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def _init_quantized(model: Transformer, *, device: torch.device, method: str) -> None:
    """`init_weights` one unit at a time (embedding, each block, final norm, head: the order of
    `named_parameters`, hence of the random draws), each block's linears quantized before the next is
    materialised."""
    from optrush.peft.quant import is_quantizable, quantize_linear  # optrush.peft imports io

    units = [("tok_embeddings", model.tok_embeddings), *((f"layers.{i}", b) for i, b in enumerate(model.layers)),
             ("norm", model.norm)]
    units += [] if model.args.tie_embeddings else [("output", model.output)]  # tied: the embedding, drawn once
    for prefix, unit in units:
        unit.to_empty(device=device)
        for name, param in unit.named_parameters(prefix=prefix):
            model.init_parameter(name, param)
        for name, module in list(unit.named_modules(prefix=prefix)):
            if is_quantizable(name, module):
                parent, _, leaf = name.removeprefix(prefix + ".").rpartition(".")
                setattr(unit.get_submodule(parent), leaf, quantize_linear(module, method=method))
    model.tie_weights()
    model.init_rope(device)


def load_model(path: str | Path, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
               quantize: str = "none") -> nn.Module:
    """The model in HF checkpoint directory `path`; dtype defaults to the checkpoint's, device to CPU.
    `quantize` (nf4, int8; peft.quantize) stores each block linear quantized the moment its weight arrives, so
    loading needs memory for the quantized model plus one weight matrix (optrush.peft.quant)."""
    path = Path(path)
    cfg = read_config(path)
    if is_reward_config(cfg):
        raise ValueError(f"{path} is a reward model ({cfg['architectures'][0]} in {path / CONFIG_FILE}: a scalar "
                         f"head, no language-model head), not a model to generate from or fine-tune as a language "
                         f"model: score texts with `optrush score {path} --data FILE`")
    dtype = dtype or checkpoint_dtype(cfg, path)
    device = torch.device(device or "cpu")
    try:
        args = args_from_hf_config(cfg)
    except UnsupportedArchitecture as unsupported:
        return _load_through_transformers(path, str(unsupported), dtype=dtype, device=device)
    except ValueError as error:
        raise ValueError(f"{path / CONFIG_FILE}: {error}") from None
    with torch.device("meta"):
        model = Transformer(args)
    return load_weights(model, path, dtype=dtype, device=device, quantize=quantize)


def load_weights(model: Transformer, path: Path, *, dtype: torch.dtype, device: torch.device,
                 quantize: str = "none") -> Transformer:
    """Give `model`, built on the meta device, the weights of checkpoint `path`, one tensor at a time (`load_model`
    after reading config.json; a reward model's loader puts its head on first)."""
    if quantize != "none":
        from optrush.peft.quant import QuantizedLinear, is_quantizable, quantize_weight  # optrush.peft imports io
    for name, tensor in _checked_tensors(path, model):
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        old = getattr(module, leaf)
        # copy=True: get_tensor returns a view of the file's memory map, and weights that alias the file would
        # crash the process (SIGBUS) if anything later rewrote that file in place
        weight = tensor.to(device=device, dtype=dtype, copy=True)
        if quantize != "none" and leaf == "weight" and is_quantizable(module_name, module):
            parent, _, child = module_name.rpartition(".")
            # the full-precision matrix dies here; the bias (if any) is set on the new layer when it arrives
            layer = QuantizedLinear(quantize_weight(weight, method=quantize), module.bias)
            setattr(model.get_submodule(parent), child, layer)
            continue
        setattr(module, leaf, nn.Parameter(weight, requires_grad=old.requires_grad))
    model.tie_weights()
    model.init_rope(device)
    return model


def load_state_into(model: nn.Module, path: str | Path) -> None:
    """Copy the weights saved in `path` into `model`'s existing parameters, in place (their dtype and device)."""
    path = Path(path)
    if isinstance(model, HFCausalLM):
        fresh = HFCausalLM.from_pretrained(path, dtype=next(model.parameters()).dtype)
        model.hf.load_state_dict(fresh.hf.state_dict())
        return
    read_config(path)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in _checked_tensors(path, model):
            params[name].copy_(tensor)


def save_model(model: nn.Module, path: str | Path, *, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write `model` to directory `path` in HF format: config.json plus model.safetensors, or shards of at most
    `max_shard_bytes` and model.safetensors.index.json. Other files already in `path` (a tokenizer) are kept."""
    with _atomic_directory(Path(path)) as tmp:
        write_model(model, tmp, max_shard_bytes=max_shard_bytes)


def write_model(model: nn.Module, directory: Path, *, max_shard_bytes: int = 5 * 2**30) -> None:
    """`save_model`'s files, written straight into `directory` (for a caller that renames its own temporary
    directory into place)."""
    if isinstance(model, HFCausalLM):
        model.save_pretrained(directory, max_shard_bytes=max_shard_bytes)
    else:
        _save_native(model, directory, max_shard_bytes=max_shard_bytes)


# ----------------------------------------------------------------------------------------------------- reading

def read_config(path: Path) -> dict:
    file = path / CONFIG_FILE
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such model directory")
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing: {path} is not a Hugging Face model directory "
                                "(expected config.json and model.safetensors or sharded *.safetensors)")
    try:
        cfg = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{file}: invalid JSON at line {error.lineno}, column {error.colno}: {error.msg}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def checkpoint_dtype(cfg: dict, path: Path) -> torch.dtype:
    """The dtype config.json declares (`dtype`, or the older `torch_dtype`); float32 when it declares none."""
    name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    if name not in DTYPES:
        raise ValueError(f"{path / CONFIG_FILE}: dtype {name!r} is not one of {', '.join(DTYPES)}; "
                         "pass dtype= explicitly")
    return DTYPES[name]


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of checkpoint `path`, from the shard index when there is one."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{index}: not a valid shard index ({error!r}); it needs a 'weight_map' object") from None
        files = [path / name for name in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise FileNotFoundError(f"{index} lists shard(s) that do not exist: {', '.join(absent)}")
        return files
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    raise FileNotFoundError(f"{path} has neither {SINGLE_FILE} nor {INDEX_FILE} (only safetensors checkpoints "
                            "are supported; re-save .bin checkpoints with save_pretrained(safe_serialization=True))")


def _read_safetensors(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{file}: not a readable safetensors file ({error}); it may be truncated or corrupt, "
                         "re-download or re-save it") from None


def _checked_tensors(path: Path, model: Transformer) -> Iterator[tuple[str, torch.Tensor]]:
    """(parameter name, tensor) for every tensor of checkpoint `path`, one at a time. Raises on a tensor the
    model lacks or with the wrong shape (naming the file) and, at the end, on parameters the checkpoint lacks."""
    params = dict(model.named_parameters())  # a tied output.weight is not listed: it is the embedding
    seen = set()
    for file in weight_files(path):
        for hf_key, tensor in _read_safetensors(file):
            if hf_key.endswith("rotary_emb.inv_freq"):
                continue  # older transformers saved the RoPE buffer; our tables are rebuilt from the config
            name = from_hf_key(hf_key)
            if name == "output.weight" and model.args.tie_embeddings:
                continue  # tied checkpoints may still store lm_head; like transformers, use the embedding
            if name not in params:
                raise ValueError(f"{file}: unexpected tensor {hf_key!r}: the {model.args.model_type} model built "
                                 f"from {path / CONFIG_FILE} has no such weight")
            if tensor.shape != params[name].shape:
                # reward models saved before the sequence-classification layout have a (1, dim) lm_head
                reward = "; it is a reward model (a scalar head): score texts with `optrush score`" \
                    if name == "output.weight" and tensor.shape[0] == 1 else ""
                raise ValueError(f"{file}: tensor {hf_key!r} has shape {tuple(tensor.shape)} but "
                                 f"{path / CONFIG_FILE} implies {tuple(params[name].shape)}{reward}")
            seen.add(name)
            yield name, tensor
    missing = [to_hf_key(name) for name in params if name not in seen]
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise ValueError(f"{path}: the checkpoint lacks {len(missing)} tensor(s) that {CONFIG_FILE} requires: {shown}")


def _load_through_transformers(path: Path, reason: str, *, dtype: torch.dtype, device: torch.device) -> HFCausalLM:
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(str(path))
    except (ValueError, KeyError) as error:
        raise UnsupportedArchitecture(f"{path / CONFIG_FILE}: {reason}; transformers cannot load it either "
                                      f"({error})") from None
    model = HFCausalLM.from_pretrained(path, dtype=dtype, device=device)
    warnings.warn(f"{path}: {reason}. Loaded through transformers as {type(model.hf).__name__} instead; "
                  f"unavailable on this path: {'; '.join(UNAVAILABLE)}.", stacklevel=3)
    return model


# ----------------------------------------------------------------------------------------------------- writing

def adopt_token_ids(model: nn.Module, tokenizer) -> None:
    """Give `model` the bos/eos/pad ids of `tokenizer` (the one it trains with) where its config has none (a
    preset, or a checkpoint whose config.json recorded none), so that the config.json saved beside that tokenizer
    names them: transformers' generate stops at an EOS only when the model's config names it. A model loaded
    through transformers (HFCausalLM) keeps its own config."""
    args = getattr(model, "args", None)
    if args is None:
        return
    for key in TOKEN_ID_KEYS:
        if getattr(args, key) is None:
            setattr(args, key, getattr(tokenizer, key))


def has_reward_head(model: Transformer) -> bool:
    """The LM head was replaced by a scalar one (optrush.objectives.reward.apply_reward_head)."""
    return model.output.weight.shape[0] == 1 < model.args.vocab_size


def _save_native(model: Transformer, directory: Path, *, max_shard_bytes: int) -> None:
    state = model.state_dict()
    if model.args.tie_embeddings:
        del state["output.weight"]  # the same storage as the embedding; HF re-ties it on load
    tensors = {to_hf_key(name): tensor.detach() for name, tensor in state.items()}
    reward_head = has_reward_head(model)
    if reward_head:  # where transformers' ForSequenceClassification models keep their head
        tensors[REWARD_HEAD_KEY] = tensors.pop(to_hf_key("output.weight"))
    shards = _plan_shards(tensors, max_shard_bytes)
    names = [SINGLE_FILE] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, keys in zip(names, shards):
        # one shard at a time on the CPU, so saving a GPU model needs host memory for one shard only
        save_file({key: tensors[key].cpu().contiguous() for key in keys}, str(directory / name),
                  metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": {key: name for name, keys in zip(names, shards) for key in keys}}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    config = hf_config_from_args(model.args, dtype=model.tok_embeddings.weight.dtype, reward_head=reward_head)
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    token_ids = {key: config[key] for key in TOKEN_ID_KEYS if config[key] is not None}
    if not reward_head and token_ids:  # a sequence classifier does not generate
        (directory / GENERATION_CONFIG_FILE).write_text(json.dumps(token_ids, indent=2) + "\n")


def _plan_shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    """Consecutive groups of keys of at most `max_bytes` each (a larger tensor gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


@contextmanager
def _atomic_directory(path: Path) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; on success move its contents to `path`. A new `path` appears
    in one rename; an existing one gets each file replaced atomically (config.json last) and the weight files and
    generation config of an older save that this one does not overwrite removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        if not path.exists():
            os.replace(tmp, path)
            return
        if not path.is_dir():
            raise FileExistsError(f"{path} exists and is not a directory")
        written = sorted(tmp.iterdir(), key=lambda f: f.name == CONFIG_FILE)
        for file in written:
            os.replace(file, path / file.name)
        names = {f.name for f in written}
        for old in path.iterdir():
            if old.name not in names and (old.suffix == ".safetensors" or old.name in (INDEX_FILE,
                                                                                        GENERATION_CONFIG_FILE)):
                old.unlink()
        tmp.rmdir()
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)

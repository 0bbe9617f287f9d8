"""Build a `Config` from a YAML file plus dotted `key=value` overrides, then check it (`optrush.config.checks`).

    cfg = load_config("optrush/recipes/demo.yaml", ["train.lr=2e-4", "data.packing=none"])
    cfg = load_config("optrush/recipes/demo.yaml", complete=False)   # a partial recipe, e.g. to print it

Every failure raises `ConfigError` with the offending key, where its value was set (the YAML file and line, or
the override), what was given and what is expected, so a bad run stops before any data is read or any model is
built. The file and the overrides are merged before anything is checked, so an override can correct the file.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from optrush.config.checks import config_problems, problems_message
from optrush.config.errors import ConfigError, did_you_mean
from optrush.config.schema import Config




def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), *,
                synthetic_data: bool = False, complete: bool = True) -> Config:
    """The resolved config: defaults, then the YAML file, then the overrides (later wins). `synthetic_data`:
    the caller feeds random tokens (`optrush bench --synthetic`), so no tokenizer is needed. `complete=False`
    skips the checks for what a run must still be given (a model.path or model.preset, a data.tokenizer), so a
    partial recipe such as optrush/recipes/demo.yaml can be loaded and shown; every other check still runs."""
    tree: dict[str, Any] = {}
    origins = Origins()
    if path is not None:
        tree, origins = read_yaml(path)
    for item in overrides:
        key, value = parse_override(item)
        try:
            set_dotted(tree, key, value)
        except ConfigError as err:  # a section the file or an earlier override set to a value
            raise ConfigError(f"{err} ({err.key} is set at {origins.of(err.key)})", key=err.key) from None
        origins.overrides.append((key, item))
    try:
        cfg = build(Config, tree, prefix="")
    except ConfigError as err:
        raise ConfigError(origins.place(err), key=err.key) from None
    problems = config_problems(cfg, synthetic_data=synthetic_data, complete=complete)
    if problems:
        raise ConfigError(problems_message([origins.annotate(problem) for problem in problems]))
    return cfg


@dataclasses.dataclass
class Origins:
    """Where the merged config's keys were set: a line of the YAML file, or an override (later overrides win), so
    that an error points at the place to fix."""
    path: Path | None = None
    lines: dict[str, int] = dataclasses.field(default_factory=dict)  # dotted key -> its line in the file
    overrides: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (dotted key, the item as given)

    def of(self, key: str | None) -> str | None:
        """`run.yaml:3` or `override train.lr=-1` for the value `key` ended up with; None for a default."""
        if key is None:
            return None
        for set_key, item in reversed(self.overrides):
            if key == set_key or key.startswith(set_key + "."):
                return f"override {item}"
        if key in self.lines:
            return f"{self.path}:{self.lines[key]}"
        for set_key, item in reversed(self.overrides):
            if set_key.startswith(key + "."):  # an unknown section that only this override names
                return f"override {item}"
        return None

    def place(self, err: ConfigError) -> str:
        """A one-key error prefixed by where that key was set (`path:line:` as compilers write it)."""
        origin = self.of(err.key)
        return f"{origin}: {err}" if origin else str(err)

    def annotate(self, problem: str) -> str:
        """A validation problem followed by where the keys it names were set; a problem may name several."""
        origins = dict.fromkeys(self.of(key) for key in mentioned_keys(problem))
        origins.pop(None, None)
        return f"{problem} (from {', '.join(origins)})" if origins else problem


def mentioned_keys(problem: str) -> list[str]:
    """The config keys a validation message names, e.g. train.warmup_steps and train.max_steps."""
    words = (word.rstrip(".") for word in re.findall(r"[A-Za-z_][\w.]*", problem))
    return [word for word in words if word in LEAF_KEYS]


def read_yaml(path: str | Path) -> tuple[dict[str, Any], Origins]:
    """The YAML file's tree, and the line of each of its keys; nothing is checked until the overrides are merged."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (give the path to a YAML file, e.g. "
                          "optrush/recipes/demo.yaml)")
    text = path.read_text()
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(yaml_error_message(path, err)) from None
    if tree is None:
        return {}, Origins(path)
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (model:, data:, train: ...), "
                          f"got {type(tree).__name__}")
    document = yaml.compose(text, Loader=yaml.SafeLoader)  # composed for the lines
    if duplicate := first_duplicate_key(document):
        key, line, first_line = duplicate
        raise ConfigError(f"{path}:{line}: duplicate key '{key}' (first set at line {first_line}); YAML would keep "
                          "only the last one and drop the first one's settings: merge the two into one")
    return tree, Origins(path, key_lines(document))


def yaml_error_message(path: Path, err: yaml.YAMLError) -> str:
    """`path:line: not valid YAML (...)`, with where the unfinished construct began (an unclosed `[` is only
    found where the file ends)."""
    if not isinstance(err, yaml.MarkedYAMLError) or err.problem_mark is None:
        return f"{path}: not valid YAML: {err}"
    mark, start = err.problem_mark, err.context_mark
    what = f"{err.problem}, column {mark.column + 1}"
    if err.context and start is not None:
        what += f"; {err.context} that begins at line {start.line + 1}, column {start.column + 1}"
    elif err.context:
        what += f"; {err.context}"
    return (f"{path}:{mark.line + 1}: not valid YAML ({what}); fix the syntax (e.g. a missing ']' or ':', or a tab "
            "used for indentation)")


def first_duplicate_key(node: yaml.Node | None, prefix: str = "") -> tuple[str, int, int] | None:
    """(dotted key, its 1-based line, the line it was first set at) of the first key set twice in one mapping of a
    composed YAML document, at any depth; None when there is none."""
    if isinstance(node, yaml.SequenceNode):
        return next(filter(None, (first_duplicate_key(item, f"{prefix}{i}.") for i, item in enumerate(node.value))),
                    None)
    if not isinstance(node, yaml.MappingNode):
        return None
    first_lines: dict[str, int] = {}
    for key_node, value_node in node.value:
        key, line = f"{prefix}{key_node.value}", key_node.start_mark.line + 1
        if key in first_lines:
            return key, line, first_lines[key]
        first_lines[key] = line
        if duplicate := first_duplicate_key(value_node, key + "."):
            return duplicate
    return None


def key_lines(node: yaml.Node | None, prefix: str = "") -> dict[str, int]:
    """Dotted key -> 1-based line of that key in a composed YAML document."""
    lines: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}{key_node.value}"
            lines[key] = key_node.start_mark.line + 1
            lines.update(key_lines(value_node, key + "."))
    return lines


def parse_override(item: str) -> tuple[str, Any]:
    """`train.lr=2e-4` -> ("train.lr", 0.0002); values are read as YAML scalars (`null`, `true`, `[0.9, 0.99]`)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.lr=2e-4)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = tree
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            section = ".".join(parents[:i + 1])
            raise ConfigError(f"override {key}: {section} is a value, not a section", key=section)
        node = child
    node[leaf] = value


def build(cls: type, tree: Any, *, prefix: str) -> Any:
    """Instantiate dataclass `cls` from a mapping, rejecting unknown keys and coercing/checking types."""
    where = prefix.rstrip(".") or "the config"
    if not isinstance(tree, dict):
        raise ConfigError(f"{where} must be a mapping of keys, got {tree!r}", key=prefix.rstrip(".") or None)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in tree:
        if key not in fields:
            raise ConfigError(unknown_key_message(prefix + str(key), [prefix + name for name in fields]),
                              key=prefix + str(key))
    values = {}
    for name, value in tree.items():
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            values[name] = build(kind, value, prefix=f"{prefix}{name}.")
            continue
        try:
            values[name] = coerce(value, kind, key=prefix + name)
        except ConfigError as err:
            raise ConfigError(str(err) + yaml_boolean_hint(value, kind), key=prefix + name) from None
    return cls(**values)


def unknown_key_message(key: str, valid: list[str]) -> str:
    close = (difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
             or difflib.get_close_matches(key, all_keys(Config), n=1, cutoff=0.6)
             or [k for k in all_keys(Config) if k.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1]])
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"unknown config key '{key}'.{hint} Valid keys here: {', '.join(sorted(valid))}"




def all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        kind = typing.get_type_hints(cls)[f.name]
        keys.extend(all_keys(kind, f"{prefix}{f.name}.") if dataclasses.is_dataclass(kind) else [prefix + f.name])
    return keys


LEAF_KEYS = frozenset(all_keys(Config))


def coerce(value: Any, kind: Any, *, key: str) -> Any:
    """Return `value` as type `kind`, or raise ConfigError naming key, value and the expected type."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return coerce(value, option, key=key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}={value!r}: expected {type_name(kind)}")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{key}={value!r}: expected one of {', '.join(map(str, args))}."
                          f"{did_you_mean(str(value), map(str, args))}")
    if origin is list:
        if isinstance(value, str) and args[0] is str:  # `key=q_proj` names one item, not a list of its letters
            return [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r}: expected a list ({type_name(kind)}), e.g. [a, b]")
        return [coerce(v, args[0], key=key) for v in value]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}={value!r}: expected a list of {len(args)} values ({type_name(kind)})")
        return tuple(coerce(v, a, key=key) for v, a in zip(value, args))
    if kind is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ConfigError(f"{key}={value!r}: expected a mapping, e.g. {{rope_type: yarn, factor: 4.0}}")
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r}: expected true or false")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r}: expected an integer")
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}={value!r}: expected a number")
    if kind is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}={value!r}: expected a string")
    raise TypeError(f"config field {key} has an unsupported annotation {kind!r}")


def type_name(kind: Any) -> str:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else type_name(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin is tuple:
        return "[" + ", ".join(type_name(a) for a in args) + "]"
    if origin is list:
        return f"[{type_name(args[0])}, ...]"
    return getattr(kind, "__name__", str(kind))




def to_dict(cfg: Config) -> dict[str, Any]:
    """The resolved config as plain data (YAML/JSON friendly)."""
    def plain(value):
        if isinstance(value, tuple):
            return list(value)
        return value
    return {k: ({kk: plain(vv) for kk, vv in v.items()} if isinstance(v, dict) else plain(v))
            for k, v in dataclasses.asdict(cfg).items()}


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def yaml_boolean_hint(value: Any, kind: Any) -> str:
    """Why a key that takes a word got true/false: YAML 1.1 reads a bare `yes`, `no`, `on` or `off` as a boolean, and
    the error would otherwise show `data.packing=False` for what the file spells `packing: no`."""
    if not isinstance(value, bool) or not takes_text(kind):
        return ""
    return (f" (YAML reads yes/no/on/off/true/false as booleans, so this value was read as {value}; quote it to "
            "give the word, e.g. \"off\")")


def takes_text(kind: Any) -> bool:
    """Whether a key of type `kind` takes a string (a plain one, or one of a Literal's words)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (Union, types.UnionType):
        return any(takes_text(option) for option in args)
    if origin is Literal:
        return all(isinstance(arg, str) for arg in args)
    return kind is str



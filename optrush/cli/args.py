"""The CONFIG + key=value arguments every config-driven command takes, and turning them into a Config."""
from __future__ import annotations

import argparse

from optrush.config import Config
from optrush.config.machine import load_config_for_machine


def add_config_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("config", nargs="?",
                        help="YAML config file (optional: key=value overrides alone start from the defaults)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=2e-4 data.packing=none")
    return parser


def config_and_overrides(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """The CONFIG argument is optional: `optrush train model.preset=debug ...` starts from the defaults."""
    if args.config is not None and "=" in args.config and not args.config.endswith((".yaml", ".yml")):
        return None, [args.config, *args.overrides]
    return args.config, args.overrides


def config_from_args(args: argparse.Namespace, **kwargs) -> Config:
    """The config as this machine runs it (`optrush.config.machine`): a config that needs a GPU stops here."""
    return load_config_for_machine(*config_and_overrides(args), **kwargs)

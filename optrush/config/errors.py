"""The error every configuration problem raises, and the spelling hint its messages share."""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class ConfigError(ValueError):
    """A configuration problem found at start-up; the message names the key and says what to do. `key`: the dotted
    key at fault, when one is (lets the loader add the YAML line it came from)."""

    def __init__(self, message: str, *, key: str | None = None):
        super().__init__(message)
        self.key = key


def did_you_mean(given: str, choices: Iterable[str]) -> str:
    """` Did you mean 'x'?` for the choice closest to a misspelt `given`, or "" when none is close."""
    close = difflib.get_close_matches(given, list(choices), n=1)
    return f" Did you mean '{close[0]}'?" if close else ""

"""The result of `optrush check`: one row per comparison, a pass/fail table, JSON, and the tolerances used.

    report = run_checks(cfg)
    report.print()                      # rich table: check, result, measured, tolerance, switch to turn off
    report.write("runs/x/check.json")   # {"passed": ..., "rows": [...], "tolerances": {...}}
    sys.exit(0 if report.passed else 1)

A row is `passed=True`, `passed=False`, or `passed=None` ("n/a": the check does not apply to this config, or the
feature it checks does not exist yet; the reason is in `detail`). A check that raised is a failed row whose detail
is the error: a crash is never a pass.
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass(kw_only=True, slots=True)
class Tolerance:
    """Bounds for one precision mode, all *relative* differences (|a - b| / |b|)."""
    loss: float
    """One forward pass: optimized loss vs reference loss on the same batch."""
    grad: float
    """One backward pass: ||g_opt - g_ref|| / ||g_ref||, the L2 norm over every parameter at once."""
    drift: float
    """Largest per-step loss difference over a short training run (precision mode vs fp32)."""


@dataclass(kw_only=True, slots=True)
class CheckResult:
    name: str
    passed: bool | None
    """True, False, or None for "not applicable" (see `detail`)."""
    measured: float | None = None
    tolerance: float | None = None
    """`measured` passes when it is <= `tolerance` (counts: 0 means none allowed)."""
    switch_to_turn_off: str | None = None
    """The config override that removes the optimization under test, for when the row fails."""
    detail: str = ""

    @property
    def status(self) -> str:
        return "n/a" if self.passed is None else ("PASS" if self.passed else "FAIL")


def compare(name: str, measured: float, tolerance: float, *, switch: str | None, detail: str = "") -> CheckResult:
    """A row that passes when `measured <= tolerance` (NaN fails)."""
    return CheckResult(name=name, passed=bool(measured <= tolerance), measured=float(measured),
                       tolerance=float(tolerance), switch_to_turn_off=switch, detail=detail)


def not_applicable(name: str, why: str) -> CheckResult:
    return CheckResult(name=name, passed=None, detail=why)


@dataclass(kw_only=True, slots=True)
class CheckReport:
    rows: list[CheckResult] = field(default_factory=list)
    tolerance: Tolerance | None = None
    precision: str = ""
    context: dict = field(default_factory=dict)
    """What was checked where: the resolved config, the device and software (`optrush.bench.provenance`)."""

    @property
    def passed(self) -> bool:
        """No row failed (n/a rows do not fail)."""
        return not self.failures

    @property
    def failures(self) -> list[CheckResult]:
        return [row for row in self.rows if row.passed is False]

    def as_dict(self) -> dict:
        rows = [{**asdict(row), "status": row.status} for row in self.rows]
        return {"passed": self.passed, "precision": self.precision,
                "tolerances": asdict(self.tolerance) if self.tolerance else None, "rows": rows, **self.context}

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.as_dict(), indent=2) + "\n")
        return path

    def print(self) -> None:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"optrush check ({self.precision})")
        for column in ("check", "result", "measured", "tolerance", "on failure, set", "detail"):
            table.add_column(column, overflow="fold")
        colors = {"PASS": "green", "FAIL": "bold red", "n/a": "dim"}
        for row in self.rows:
            table.add_row(row.name, f"[{colors[row.status]}]{row.status}[/]", _number(row.measured),
                          _number(row.tolerance), (row.switch_to_turn_off or "") if row.passed is False else "",
                          row.detail)
        console = Console(width=None if sys.stdout.isatty() else 160)  # logs and CI: do not wrap at 80
        console.print(table)
        failed = len(self.failures)
        console.print(f"{failed} failed, {sum(r.passed is True for r in self.rows)} passed, "
                      f"{sum(r.passed is None for r in self.rows)} not applicable")


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.3g}"

"""`optrush train CONFIG --nproc N`: run the same command as N processes on this machine through torchrun.

    optrush train run.yaml parallel.strategy=fsdp --nproc 8
    # is python -m torch.distributed.run --standalone --nproc-per-node=8 -m optrush train run.yaml parallel.strategy=fsdp

Several nodes: run torchrun yourself on every node (README, "Multi-GPU").

torchrun runs inside this process, through torch.distributed.run's own functions, imported only once the config
has been checked (a bad config still stops in a moment; importing torch touches no device, they stay the
processes'). That is what lets a failed run read as its error: each process hands its error message to this one
(a file each in a temporary folder named by OPTRUSH_ERRORS_DIR), which prints every distinct message once and one
line on which processes failed, instead of N copies of the error followed by torchrun's ChildFailedError
traceback. Ctrl-C and SIGTERM are torchrun's to handle: it passes the signal on and waits for the processes to stop.
"""
from __future__ import annotations

import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from optrush.atomic import written_whole
from optrush.config import Config, ConfigError

if TYPE_CHECKING:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
ERRORS_DIR_VARIABLE = "OPTRUSH_ERRORS_DIR"


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def torchrun_arguments(arguments: list[str], *, nproc: int) -> list[str]:
    """torchrun's arguments that run `optrush <arguments>` as `nproc` processes on this machine (`--standalone`: a
    local rendezvous on a free port)."""
    return ["--standalone", f"--nproc-per-node={nproc}", "-m", "optrush", *arguments]


def torchrun_command(arguments: list[str], *, nproc: int) -> list[str]:
    """The same as a command line, for callers that run it as a process of its own (bench, one try each)."""
    return [sys.executable, "-m", "torch.distributed.run", *torchrun_arguments(arguments, nproc=nproc)]


def relaunch_with_torchrun(arguments: list[str], *, nproc: int, cfg: Config) -> int:
    """Run `optrush <arguments>` under torchrun with `nproc` processes; returns torchrun's exit status (1 when a
    process failed, after printing the processes' errors once). A process count the config cannot split stops
    here, once, instead of in every process it would start."""
    check_process_count(nproc, cfg)
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    with tempfile.TemporaryDirectory(prefix="optrush_errors_") as errors_dir:
        os.environ[ERRORS_DIR_VARIABLE] = errors_dir  # the processes torchrun starts inherit this environment
        try:
            run_torchrun(torchrun_arguments(arguments, nproc=nproc))
        except ChildFailedError as failed:
            report_failure(failed, Path(errors_dir), world=nproc)
            return 1  # what torchrun exits with when a process failed
        except SignalException as stopped:  # torchrun stopped the processes before raising this
            if stopped.sigval == signal.SIGINT and not print_handed_errors(Path(errors_dir), world=nproc):
                raise KeyboardInterrupt from stopped  # nothing said where training stopped: the CLI's one line
            return 128 + stopped.sigval  # as a shell reports a command stopped by that signal
        finally:
            del os.environ[ERRORS_DIR_VARIABLE]
    return 0


def check_process_count(nproc: int, cfg: Config) -> None:
    if nproc < 1:
        raise ConfigError(f"--nproc {nproc}: give the number of processes (one per device) to run, >= 1")
    if cfg.parallel.strategy == "none":
        raise ConfigError(f"--nproc {nproc} runs one process per device, which needs parallel.strategy=fsdp "
                          "(or ddp, hsdp)")
    if cfg.parallel.strategy == "hsdp" and nproc % cfg.parallel.replicate:
        raise ConfigError(f"--nproc {nproc}: parallel.replicate={cfg.parallel.replicate} must divide the number of "
                          "processes (hsdp shards each replica over nproc / replicate of them)")
    if nproc % cfg.context.degree:
        raise ConfigError(f"--nproc {nproc}: context.degree={cfg.context.degree} must divide the number of "
                          "processes (each context group splits every row over that many of them)")


def run_torchrun(argv: list[str]) -> None:
    """`torchrun <argv>` in this process; raises ChildFailedError when a process fails."""
    from torch.distributed.run import parse_args, run

    run(parse_args(argv))


# ------------------------------------------------------------------------- errors, from the processes to here

def hand_error_to_launcher(message: str) -> bool:
    """In a process `--nproc` started: leave `message` (what it would print, less "optrush: ") for the launcher to
    print, and return True. False anywhere else (one process, or a torchrun started by hand), where the caller
    prints it itself."""
    errors_dir = os.environ.get(ERRORS_DIR_VARIABLE)
    if errors_dir is None or not launched_by_torchrun():
        return False
    try:
        # whole or absent: torchrun may stop this process at any moment
        with written_whole(Path(errors_dir, f"rank_{os.environ['RANK']}.txt")) as partial:
            partial.write_text(message)
    except OSError:  # the launcher's folder is gone: print it after all
        return False
    return True


def report_failure(failed: ChildFailedError, errors_dir: Path, *, world: int) -> None:
    """The processes' messages (`print_handed_errors`), then one line on how the processes ended (their own
    tracebacks, if any, are above)."""
    print_handed_errors(errors_dir, world=world)
    print(f"optrush: {how_processes_ended(failed, world=world)}", file=sys.stderr)


def print_handed_errors(errors_dir: Path, *, world: int) -> bool:
    """Print each distinct message the processes left in `errors_dir` once: plainly when all `world` of them
    left it, else after the ranks that did, so that one rank's own error is never hidden behind another's (a
    Ctrl-C's "interrupted after step N" comes from every rank, and is printed once). Whether there was any."""
    handed = {int(path.stem.removeprefix("rank_")): path.read_text() for path in errors_dir.glob("rank_*.txt")}
    ranks_by_message: dict[str, list[int]] = {}
    for rank, message in sorted(handed.items()):
        ranks_by_message.setdefault(message, []).append(rank)
    for message, ranks in ranks_by_message.items():
        where = "" if len(ranks) == world else f"[rank{'s' * (len(ranks) > 1)} {', '.join(map(str, ranks))}] "
        print(f"optrush: {where}{message}", file=sys.stderr)
    return bool(handed)


def how_processes_ended(failed: ChildFailedError, *, world: int) -> str:
    """E.g. "1 of 2 processes failed (exit code 2); torchrun stopped the other 1". Once one process fails,
    torchrun stops the others with SIGTERM, and counts them as failed too."""
    stopped = [rank for rank, failure in failed.failures.items() if failure.exitcode == -signal.SIGTERM]
    if len(stopped) == len(failed.failures):  # SIGTERM from elsewhere stopped them all: that is how they failed
        stopped = []
    ends = sorted({f"exit code {failure.exitcode}" if failure.exitcode > 0 else f"killed by {failure.signal_name()}"
                   for rank, failure in failed.failures.items() if rank not in stopped})
    summary = f"{len(failed.failures) - len(stopped)} of {world} processes failed ({', '.join(ends)})"
    return summary + (f"; torchrun stopped the other {len(stopped)}" if stopped else "")

"""A failed `optrush train ... --nproc N` reads as its error, once: the N processes hand their messages to the
launcher (optrush.parallel.launch), which prints each distinct one once and a line on how the processes ended,
instead of N copies followed by torchrun's ChildFailedError traceback."""
import json
import os
import subprocess
import sys

from optrush.cli.main import main
from optrush.parallel.launch import ERRORS_DIR_VARIABLE, report_failure


def test_an_error_every_rank_hits_is_printed_once_without_torchruns_traceback(recipe_corpus, tokenizer_dir,
                                                                              tmp_path):
    records = [json.dumps(r) for r in recipe_corpus[1][:20]]
    records[3] = records[3][:-1]  # a closing brace missing
    data = tmp_path / "broken.jsonl"
    data.write_text("\n".join(records) + "\n")
    done = subprocess.run([sys.executable, "-m", "optrush", "train", f"data.path={data}",
                           f"data.tokenizer={tokenizer_dir}", "model.preset=debug", "data.format=recipe",
                           "train.device=cpu", "checkpoint.resume=never", f"output_dir={tmp_path / 'run'}",
                           "parallel.strategy=fsdp", "--nproc", "2"],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert done.returncode == 1, done.stderr  # torchrun's exit status when a process failed
    # "[rank 0] " before it when torchrun stopped rank 1 before rank 1 reached the error
    assert done.stderr.count(f"data error: {data}:4: not valid JSON") == 1, done.stderr
    assert "ChildFailedError" not in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert "of 2 processes failed (exit code 2)" in done.stderr.splitlines()[-1]


def test_a_rank_hands_its_error_to_the_launcher_instead_of_printing_it(tmp_path, monkeypatch, capsys):
    for name, value in dict(RANK="1", LOCAL_RANK="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="1",
                            **{ERRORS_DIR_VARIABLE: str(tmp_path)}).items():
        monkeypatch.setenv(name, value)
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert capsys.readouterr().err == ""
    assert "missing.yaml" in (tmp_path / "rank_1.txt").read_text()


def test_the_launcher_prints_each_distinct_error_once_naming_the_ranks_unless_all_hit_it(tmp_path, capsys):
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    def failed(*exitcodes):
        return ChildFailedError("optrush", {rank: ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=code,
                                                                 error_file="")
                                            for rank, code in enumerate(exitcodes)})

    for rank in range(3):
        (tmp_path / f"rank_{rank}.txt").write_text("data error: a.jsonl:4: not valid JSON")
    report_failure(failed(2, 2, 2), tmp_path, world=3)
    assert capsys.readouterr().err == ("optrush: data error: a.jsonl:4: not valid JSON\n"
                                       "optrush: 3 of 3 processes failed (exit code 2)\n")

    (tmp_path / "rank_2.txt").write_text("error (OSError): rank 2's disk is full")
    report_failure(failed(2, -15, 2), tmp_path, world=3)
    assert capsys.readouterr().err == ("optrush: [ranks 0, 1] data error: a.jsonl:4: not valid JSON\n"
                                       "optrush: [rank 2] error (OSError): rank 2's disk is full\n"
                                       "optrush: 2 of 3 processes failed (exit code 2); torchrun stopped the other 1\n")


def test_ctrl_c_under_nproc_says_where_training_stopped_once(tmp_path, monkeypatch, debug_overrides, capsys):
    """Every rank used to print its own "interrupted after step N", and the launcher "interrupted" after them."""
    import signal

    from torch.distributed.elastic.multiprocessing.api import SignalException

    import optrush.parallel.launch as launch

    for name in launch.TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)

    def interrupted_ranks(argv):
        errors_dir = os.environ[ERRORS_DIR_VARIABLE]
        for rank in range(2):  # what each rank's main() hands over on Ctrl-C
            with open(os.path.join(errors_dir, f"rank_{rank}.txt"), "w") as handle:
                handle.write("interrupted after step 3; no checkpoint was saved")
        raise SignalException("Process got signal: 2", signal.SIGINT)

    monkeypatch.setattr(launch, "run_torchrun", interrupted_ranks)
    assert main(["train", *debug_overrides, "parallel.strategy=ddp", "--nproc", "2"]) == 130
    err = capsys.readouterr().err
    assert err == "optrush: interrupted after step 3; no checkpoint was saved\n"

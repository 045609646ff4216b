"""The main job end to end, under torchrun with 2 gloo ranks: a killed and resumed run gives the loss curve of an
uninterrupted one (interrupted with Ctrl-C part-way), and --compare leaves its plot and table."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--dim", "32", "--layers", "2", "--heads", "2", "--seq-len", "32", "--batch-size", "4", "--val-batches", "1"]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    # A small corpus keeps start-up short; the stdlib corpus itself is covered in test_job_parts.py.
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_bytes(b"".join((ROOT / "distopt" / name).read_bytes() for name in ("optimizer.py", "owner.py")))
    return path


def train(*args: str, nproc: int = 2, timeout: float = 240) -> str:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               str(ROOT / "launch" / "train.py"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DISTOPT_COMPILE": "0"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert done.returncode == 0, f"train.py {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done.stdout + done.stderr


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def interrupt_after(step: int, *args: str, timeout: float = 240) -> tuple[int, str]:
    """Run the job and press Ctrl-C (SIGINT to torchrun, which passes it to the ranks) once ``step`` is logged."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(ROOT / "launch" / "train.py"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DISTOPT_COMPILE": "0"}
    log = Path(args[args.index("--out") + 1]) / "metrics.jsonl"
    with tempfile.TemporaryFile("w+") as output:
        job = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
        deadline = time.monotonic() + timeout
        while job.poll() is None and time.monotonic() < deadline:
            if log.exists() and len(log.read_text().splitlines()) >= step:
                job.send_signal(signal.SIGINT)
                break
            time.sleep(0.02)
        try:
            code = job.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            job.kill()
            raise
        output.seek(0)
        return code, output.read()


def test_interrupted_and_resumed_run_repeats_the_uninterrupted_loss_curve(tmp_path, text_file):
    steps = 60
    common = ["--optimizer", "muon", "--steps", str(steps), "--ckpt-every", "3", "--eval-every", "4", "--data",
              str(text_file), *TINY]
    train(*common, "--out", str(tmp_path / "whole"))
    code, log = interrupt_after(7, *common, "--out", str(tmp_path / "split"))
    assert code != 0 and "interrupted: the same command with --resume continues" in log, log[-3000:]
    assert "[rank0]: Traceback" not in log and "[rank1]: Traceback" not in log, log[-3000:]
    saved = sorted(int(p.name.split("-")[-1]) for p in (tmp_path / "split" / "checkpoints").glob("step-*"))
    assert saved and 6 <= saved[-1] < steps, saved  # stopped part-way, after a checkpoint
    log = train(*common, "--out", str(tmp_path / "split"), "--resume")
    assert "resumed from" in log and f"at step {saved[-1]}" in log

    whole, split = metrics(tmp_path / "whole"), metrics(tmp_path / "split")
    assert [r["step"] for r in split] == list(range(1, steps + 1))  # steps past the checkpoint, redone once
    for a, b in zip(whole, split):
        assert (a["step"], a["loss"], a["lr"], a.get("val_loss")) == (b["step"], b["loss"], b["lr"], b.get("val_loss"))
    assert whole[-1]["loss"] < whole[0]["loss"]
    assert (tmp_path / "split" / "loss.png").stat().st_size > 0
    # The end of a run always leaves a checkpoint, even off the --ckpt-every grid.
    assert (tmp_path / "whole" / "checkpoints" / f"step-{steps:08d}").is_dir()


def test_compare_trains_each_optimizer_from_the_same_start(tmp_path, text_file):
    out = tmp_path / "cmp"
    log = train("--compare", "adamw,soap", "--steps", "3", "--data", str(text_file), "--out", str(out), *TINY)
    first = {name: metrics(out / name)[0]["loss"] for name in ("adamw", "soap")}
    assert first["adamw"] == first["soap"]  # same weights and batch before any step
    table = (out / "compare.md").read_text()
    assert "| adamw |" in table and "| soap |" in table and "| adamw |" in log
    assert (out / "compare.png").stat().st_size > 0


def test_compare_runs_each_precision_in_its_own_dtype_and_checkpoints_compact_state(tmp_path, text_file):
    """``NAME@PRECISION``: bfloat16 parameters with Kahan summation, and 8-bit states; each from the same start, and
    a checkpoint of the compact state resumes."""
    out = tmp_path / "precision"
    train("--compare", "adamw,adamw@bf16-kahan,muon@int8", "--steps", "3", "--data", str(text_file), "--out",
          str(out), "--ckpt-dir", str(tmp_path / "ckpt"), "--ckpt-every", "2", *TINY)
    first = {name: metrics(out / name)[0]["loss"] for name in ("adamw", "adamw@bf16-kahan", "muon@int8")}
    assert first["adamw"] == first["muon@int8"]
    assert first["adamw@bf16-kahan"] != first["adamw"]  # the bfloat16 model computes another first loss
    assert abs(first["adamw@bf16-kahan"] - first["adamw"]) < 0.05 * first["adamw"]
    table = (out / "compare.md").read_text()
    assert "| adamw@bf16-kahan |" in table and "| muon@int8 |" in table
    assert (tmp_path / "ckpt" / "muon@int8").is_dir()

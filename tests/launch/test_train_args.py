"""The main job's bad input: every flag is checked before any process starts, and a fresh run refuses a folder that
holds another run's checkpoints instead of mixing the two."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch.train import parse_args

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("argv,message", [
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--val-batches", "0"], "--val-batches must be >= 1, got 0"),
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--eval-every", "0"], "--eval-every must be >= 1, got 0"),
    (["--layers", "-2"], "--layers must be >= 1, got -2"),
    (["--ckpt-every", "-1"], "--ckpt-every must be >= 0, got -1"),
    (["--warmup", "-5"], "--warmup must be >= 0, got -5"),
    (["--lr", "0"], "--lr must be > 0, got 0.0"),
    (["--lr", "nan"], "--lr must be > 0, got nan"),
    (["--weight-decay", "-0.1"], "--weight-decay must be >= 0, got -0.1"),
    (["--heads", "3"], "--dim 128 --heads 3: dim=128 must split into 3 heads"),
    (["--dim", "24", "--heads", "8"], "--dim 24 --heads 8: dim=24 must split into 8 heads of an even size"),
    (["--mesh=-1x-1"], "--mesh '-1x-1': expected REPLICASxSHARDS of positive counts"),
    (["--mesh", "0x2"], "--mesh '0x2': expected REPLICASxSHARDS of positive counts"),
    (["--mesh", "2x"], "--mesh '2x': expected REPLICASxSHARDS"),
    (["--mesh", "2x2x2"], "--mesh '2x2x2': expected REPLICASxSHARDS"),
    (["--compare", ","], "--compare: no optimizer named"),
    (["--compare", "adamw,muon,adamw"], "--compare: adamw named more than once"),
    (["--compare", "adamw,sgd9"], "unknown optimizer(s) ['sgd9']"),
    (["--compare", "adamw", "--resume"], "it does not take --resume"),
    (["--compare", "adamw,adamw@bf17"], "unknown precision in ['adamw@bf17']"),
    (["--precision", "int3"], "argument --precision: invalid choice: 'int3'"),
    (["--data", "/no/such/file.txt"], "--data /no/such/file.txt: no such file"),
])
def test_bad_flags_are_named(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_args(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_good_flags_pass():
    args = parse_args(["--mesh", "2x1", "--compare", " adamw , muon", "--ckpt-every", "0", "--warmup", "0"])
    assert args.mesh_shape == (2, 1) and args.compare == ["adamw", "muon"]
    args = parse_args(["--compare", "adamw,adamw@bf16-kahan,muon@int8", "--precision", "bf16-sr"])
    assert args.compare == ["adamw", "adamw@bf16-kahan", "muon@int8"] and args.precision == "bf16-sr"


def _train(*args: str) -> subprocess.CompletedProcess:
    """One rank, no torchrun: the job's own single-process path."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DISTOPT_COMPILE": "0"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), *args], capture_output=True,
                          text=True, timeout=180, env=env, cwd=ROOT)


def test_a_fresh_run_refuses_another_runs_checkpoints_and_resume_still_works(tmp_path):
    data = tmp_path / "text.txt"
    data.write_bytes((ROOT / "distopt" / "optimizer.py").read_bytes())
    tiny = ["--optimizer", "adamw", "--dim", "16", "--layers", "1", "--heads", "2", "--seq-len", "16",
            "--batch-size", "2", "--val-batches", "1", "--data", str(data), "--out", str(tmp_path / "run")]
    first = _train(*tiny, "--steps", "3")
    assert first.returncode == 0, first.stderr[-3000:]
    saved = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name != ".lock")
    assert saved == ["step-00000003"]
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()

    again = _train(*tiny, "--steps", "5")
    assert again.returncode == 2
    assert "checkpoints holds checkpoints of an earlier run (latest: step-00000003). Pass --resume" in again.stderr
    assert "Traceback" not in again.stderr
    # Nothing of the earlier run was touched.
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name != ".lock") == saved
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == metrics

    resumed = _train(*tiny, "--steps", "5", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "step-00000003 at step 3" in resumed.stdout
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 5


def test_without_the_job_extra_the_job_says_how_to_install_it_once(tmp_path):
    """tqdm hidden from the job (find_spec reports it missing): one line, no traceback, exit 2."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    code = ("import importlib.util, sys; real = importlib.util.find_spec\n"
            "importlib.util.find_spec = lambda name, *a: None if name == 'tqdm' else real(name, *a)\n"
            f"sys.path.insert(0, {str(root)!r}); sys.argv = ['train.py']\n"
            "import runpy; runpy.run_path('launch/train.py', run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "needs tqdm (the job extra): pip install" in done.stderr
    assert "Traceback" not in done.stderr and done.stderr.count("needs tqdm") == 1

"""The main job on a plain install: the wheel, without any extra, in a fresh virtual
environment, runs the packaged quick suite green with no warning (slow: it installs
saebench's dependencies from the package registries, torch as the README installs it)."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TORCH = ["torch==2.13.0", "--index-url", "https://download.pytorch.org/whl/cpu"]


def _run(args: list[str], cwd: Path, timeout: int = 1200) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "VIRTUAL_ENV"))}
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=env, check=False)


@pytest.mark.slow
def test_the_wheel_without_extras_runs_the_quick_suite_green(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps",
                    "--no-build-isolation", "-q", "-w", str(tmp_path)], check=True, timeout=600)
    (wheel,) = tmp_path.glob("saebench-*.whl")
    venv.create(tmp_path / "venv", with_pip=True)
    python = str(tmp_path / "venv" / "bin" / "python")
    torch = _run([python, "-m", "pip", "install", "-q", "--retries", "0", *TORCH], tmp_path)
    if torch.returncode != 0:  # no CPU index reachable: the registries' torch 2.13.0
        torch = _run([python, "-m", "pip", "install", "-q", "torch==2.13.0"], tmp_path)
    assert torch.returncode == 0, torch.stderr[-2000:]
    installed = _run([python, "-m", "pip", "install", "-q", str(wheel)], tmp_path)
    assert installed.returncode == 0, installed.stderr[-2000:]
    extras = _run([python, "-c", "import importlib.util as u; print([m for m in "
                   "('sparsify', 'xdist', 'hypothesis', 'ray') if u.find_spec(m)])"], tmp_path)
    assert extras.stdout.strip() == "[]", extras.stdout  # nothing of an extra came along
    empty = tmp_path / "empty"
    empty.mkdir()
    ran = _run([str(tmp_path / "venv" / "bin" / "saebench"), "run", "toy", "-p",
                "no:cacheprovider"], empty)
    summary = ran.stdout.strip().splitlines()[-1]
    assert ran.returncode == 0, ran.stdout[-3000:]
    assert " failed" not in summary and " error" not in summary, summary
    assert "warning" not in summary, ran.stdout[-3000:]  # no PytestUnknownMarkWarning
    assert "xfailed" in summary and "measured" in summary, summary
    (run_dir,) = (empty / "reports").iterdir()
    assert (run_dir / "report.md").is_file()

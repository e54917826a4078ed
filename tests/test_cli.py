"""The `saebench` command: one argparse tree, its exit codes."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import saebench
from saebench.cli import build_parser, main


def saebench_cmd(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "saebench", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=600)


def test_version_and_help_name_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"saebench {saebench.__version__}"
    text = build_parser().format_help()
    for command in ("run", "report", "gate", "leaderboard", "export", "zoo"):
        assert command in text
    assert "exit codes" in text


@pytest.mark.parametrize("command", ["report", "gate", "leaderboard", "export"])
def test_a_missing_input_is_exit_2_with_one_line(command, tmp_path, capsys):
    missing, out = str(tmp_path / "nowhere"), str(tmp_path / "out")
    args = {"report": [missing], "gate": [missing, "--baseline", missing],
            "leaderboard": [missing, "-o", out], "export": [missing, "-o", out]}[command]
    assert main([command, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err and len(err.splitlines()) == 1


def test_usage_errors_are_exit_2():
    assert saebench_cmd("gate").returncode == 2
    assert saebench_cmd("frobnicate").returncode == 2


def test_run_passes_pytest_options_and_exit_codes_through(tmp_path):
    (tmp_path / "mini.yaml").write_text(textwrap.dedent("""\
        model: zoo
        data: {source: zoo, n_tokens: 1024}
        dictionaries: {good: {zoo: resid-L2-topk16}}
        defaults: {options: {n_boot: 50}}
        checks:
          - {metric: l0, dictionaries: [good], threshold: "<= 70"}
          - {metric: cossim, dictionaries: [good], threshold: ">= 0.999"}
        """))
    passing = saebench_cmd("run", "mini.yaml", "-k", "l0", "-p", "no:cacheprovider",
                           cwd=tmp_path)
    assert passing.returncode == 0, passing.stdout[-2000:]
    assert "1 passed" in passing.stdout
    failing = saebench_cmd("run", "mini.yaml", "-p", "no:cacheprovider", cwd=tmp_path)
    assert failing.returncode == 1 and "cossim" in failing.stdout

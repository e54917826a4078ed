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


def test_the_packaged_toy_suite_runs_by_name_from_an_empty_directory(tmp_path):
    """`saebench run toy` needs no checkout: the suite ships in the package (the wheel test
    below shows it is packaged, not read from the source tree)."""
    ran = saebench_cmd("run", "toy", "-k", "resid-L2-topk16 and l0 and not drift", "-p",
                       "no:cacheprovider", "--saebench-tokens", "2048", cwd=tmp_path)
    assert ran.returncode == 0, ran.stdout[-2000:]
    assert "1 passed" in ran.stdout
    (run_dir,) = (tmp_path / "reports").iterdir()
    assert (run_dir / "report.md").is_file()
    unknown = saebench_cmd("run", "toy2", cwd=tmp_path)
    assert unknown.returncode == 2
    assert "suite 'toy2': no such file, nor a packaged suite (the package has: toy, " \
           "toy-full)" in unknown.stderr
    for suite, count in (("toy", 45), ("toy-full", 302)):
        collected = subprocess.run([sys.executable, "-m", "pytest", "-m", "eval", "--suite",
                                    suite, "--collect-only", "-q", "-p", "no:cacheprovider"],
                                   capture_output=True, text=True, cwd=tmp_path, timeout=600)
        assert f"{count} tests collected" in collected.stdout, collected.stdout[-2000:]


def test_the_wheel_ships_the_toy_suite_and_the_zoo(tmp_path):
    import zipfile

    root = Path(__file__).parents[1]
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(root), "--no-deps",
                    "--no-build-isolation", "-q", "-w", str(tmp_path)], check=True, timeout=600)
    (wheel,) = tmp_path.glob("saebench-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"saebench/suites/toy.yaml", "saebench/suites/toy-full.yaml"} <= names
    assert "saebench/zoo/artifacts/manifest.json" in names

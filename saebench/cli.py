"""The `saebench` command: one argparse tree over the package's tools.

    saebench run toy [pytest args]                 a suite's checks (as `pytest -m eval`): a
                                                   suite file, or a packaged suite by name
    saebench report RUN_DIR                        rebuild a run's report.md and plots
    saebench gate NEW --baseline OLD               what regressed between two runs
    saebench run toy --shard 2/3                   one shard of the checks (CI matrix, Slurm)
    saebench run toy --ray [ADDRESS]               the check groups as Ray tasks
    saebench merge RUN_DIR... -o RUN_DIR           merge shards' run directories into one
    saebench leaderboard RUN_DIR... -o DIR         rank dictionaries across runs
    saebench export RUN_DIR --format saebench-core -o DIR
    saebench zoo build --out DIR [--dictionaries A,B] | info   the embedded toy zoo

Exit codes: 0 success; 1 a check failed or regressed (`run`, `gate`); 2 a usage or input
error; `run` passes pytest's own codes through (4 usage, 5 nothing collected).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import saebench


def _run(args: argparse.Namespace) -> int:
    import pytest

    from saebench.discovery import suite_arg

    try:
        suites = [suite_arg(s) for s in args.suites]
    except pytest.UsageError as err:
        print(f"saebench run: {err}", file=sys.stderr)
        return 2
    shard = ["--saebench-shard", args.shard] if args.shard else []
    ray = ["--saebench-ray", args.ray] if args.ray is not None else []
    return int(pytest.main(["-m", "eval", *suites, *shard, *ray, *args.pytest_args]))


def _report(args: argparse.Namespace) -> int:
    from saebench import report

    return report.main([str(args.run_dir), "--worst-prompts", str(args.worst_prompts)])


def _zoo_build(args: argparse.Namespace) -> int:
    from saebench.zoo.paths import build_target_problem

    problem = build_target_problem(Path(args.out))
    if problem:
        print(f"saebench zoo build: {problem}", file=sys.stderr)
        return 2
    from saebench.zoo.build import BuildError, BuildSettings, build, build_dictionaries

    settings = BuildSettings.tiny() if args.tiny else BuildSettings()
    if args.seed is not None:
        settings = BuildSettings(**{**settings.__dict__, "seed": args.seed})
    if args.dictionaries is None:
        build(Path(args.out), settings)
        return 0
    names = [name.strip() for name in args.dictionaries.split(",") if name.strip()]
    try:
        build_dictionaries(Path(args.out), settings, names)
    except (BuildError, FileNotFoundError) as err:
        print(f"saebench zoo build: {err}", file=sys.stderr)
        return 2
    return 0


def _zoo_info(args: argparse.Namespace) -> int:
    from saebench.loading import zoo_summary

    print(zoo_summary(Path(args.zoo) if args.zoo else None))
    return 0


def _lazy(module: str, function: str) -> Callable[[argparse.Namespace], int]:
    """A handler that imports `module` only when its command runs (torch stays unloaded
    for `--help` and for the commands that do not need it)."""
    def handler(args: argparse.Namespace) -> int:
        import importlib

        return getattr(importlib.import_module(module), function)(args)

    return handler


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `saebench` command."""
    from saebench import gate, leaderboard, merge, saebench_core
    from saebench.zoo.paths import ARTIFACTS

    parser = argparse.ArgumentParser(
        prog="saebench", description="Faithfulness checks for SAEs and transcoders spliced "
        "into language models: run suites, read reports, gate against baselines, rank.",
        epilog="exit codes: 0 ok, 1 a check failed or regressed, 2 a usage or input error",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"saebench {saebench.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run suites' checks (the same items and reports as "
                                          "`pytest -m eval SUITE`)", allow_abbrev=False,
                              epilog="Any further argument is passed to pytest, e.g. -k resid "
                                     "--saebench-baseline DIR.")
    run.add_argument("suites", nargs="+", metavar="SUITE",
                     help="suite files, or packaged suites by name (toy)")
    run.add_argument("--shard", default=None, metavar="I/N",
                     help="run shard I of N of the checks (then `saebench merge` the shards)")
    run.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                     help="compute the check groups as Ray tasks: on the cluster at ADDRESS, "
                          "or a local one (needs saebench[ray])")
    run.set_defaults(func=_run)

    report = commands.add_parser("report", help="rebuild report.md of a run from its CSV files")
    report.add_argument("run_dir", type=Path, help="the run directory (reports/<run-id>)")
    report.add_argument("--worst-prompts", type=int, default=5, metavar="K",
                        help="prompts listed per task and dictionary (default 5; 0: none)")
    report.set_defaults(func=_report)

    gate_cmd = commands.add_parser("gate", help="compare a run with a baseline: what regressed "
                                                "beyond tolerance and noise")
    gate.add_arguments(gate_cmd)
    gate_cmd.set_defaults(func=_lazy("saebench.gate", "run"))

    board = commands.add_parser("leaderboard", help="rank dictionaries across runs, with "
                                                    "Pareto plots")
    leaderboard.add_arguments(board)
    board.set_defaults(func=_lazy("saebench.leaderboard", "run"))

    merge_cmd = commands.add_parser("merge", help="merge shard run directories into one run "
                                                  "directory and build its report")
    merge.add_arguments(merge_cmd)
    merge_cmd.set_defaults(func=_lazy("saebench.merge", "run"))

    export = commands.add_parser("export", help="write a run's results in another format "
                                                "(SAEBench core-eval JSON)")
    saebench_core.add_export_arguments(export)
    export.set_defaults(func=_lazy("saebench.saebench_core", "run_export"))

    zoo = commands.add_parser("zoo", help="the embedded toy zoo").add_subparsers(
        dest="zoo_command", required=True, metavar="ZOO_COMMAND")
    build = zoo.add_parser("build", help="rebuild the zoo deterministically from a seed")
    build.add_argument("--out", required=True, metavar="DIR",
                       help="output directory: new, or a zoo built before (in a source "
                            f"checkout, {ARTIFACTS.parent.name}/{ARTIFACTS.name} rebuilds "
                            "the packaged zoo; an installed package's zoo is refused)")
    build.add_argument("--tiny", action="store_true", help="tiny settings (a smoke test)")
    build.add_argument("--seed", type=int, default=None, help="build seed (default 0)")
    build.add_argument("--dictionaries", default=None, metavar="NAMES",
                       help="comma-separated dictionary names: (re)build only these into the "
                            "existing zoo at --out, on its model, leaving the rest as it is")
    build.set_defaults(func=_zoo_build)
    info = zoo.add_parser("info", help="print a table of what the zoo holds")
    info.add_argument("--zoo", default=None, help="zoo directory (default: the packaged zoo)")
    info.set_defaults(func=_zoo_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `saebench` console script."""
    parser = build_parser()
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if args.command != "run" and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.pytest_args = rest
    return args.func(args)

"""The `saebench` command line: `saebench zoo build|info`, `saebench report <run-dir>`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _zoo_build(args: argparse.Namespace) -> int:
    from saebench.zoo.build import BuildSettings, build

    settings = BuildSettings.tiny() if args.tiny else BuildSettings()
    if args.seed is not None:
        settings = BuildSettings(**{**settings.__dict__, "seed": args.seed})
    build(Path(args.out), settings)
    return 0


def _zoo_info(args: argparse.Namespace) -> int:
    from saebench.loading import zoo_summary

    print(zoo_summary(Path(args.zoo) if args.zoo else None))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `saebench` command."""
    from saebench.zoo.paths import ARTIFACTS

    parser = argparse.ArgumentParser(prog="saebench", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    zoo = commands.add_parser("zoo", help="the embedded toy zoo").add_subparsers(
        dest="zoo_command", required=True)
    build = zoo.add_parser("build", help="rebuild the zoo deterministically from a seed")
    build.add_argument("--out", default=str(ARTIFACTS), help="output directory")
    build.add_argument("--tiny", action="store_true", help="tiny settings (a smoke test)")
    build.add_argument("--seed", type=int, default=None, help="build seed (default 0)")
    build.set_defaults(func=_zoo_build)
    info = zoo.add_parser("info", help="print a table of what the zoo holds")
    info.add_argument("--zoo", default=None, help="zoo directory (default: the packaged zoo)")
    info.set_defaults(func=_zoo_info)
    commands.add_parser("report", add_help=False,
                        help="rebuild report.md of a run from its results.csv "
                             "(`saebench report --help`)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `saebench` console script."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["report"]:
        from saebench.report import main as report_main

        return report_main(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)

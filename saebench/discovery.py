"""Which YAML files are suites, and a repair of pytest's rootdir decision for our options.

pytest picks the rootdir and ini file on a first parse of the command line, before plugins
loaded from entry points have added their options. The value of `--saebench-report-dir DIR`
(space-separated) is then taken for a test path, so DIR becomes the rootdir, the project's
`pyproject.toml` (testpaths, addopts, markers, `saebench_suite_dirs`) is not read, and no
suite is found. `pytest_load_initial_conftests` below redoes that decision once our options
are known. This module imports only pytest, so that it stays cheap to import.
"""

from __future__ import annotations

import argparse
import copy
import os
from collections.abc import Iterable
from pathlib import Path

import pytest

SUITE_SUFFIXES = (".yaml", ".yml")
PACKAGED = Path(__file__).parent / "suites"
"""The suites shipped in the package (the toy suite), named by their file's stem."""


def packaged_suites() -> dict[str, Path]:
    """The packaged suites by name: `{"toy": .../saebench/suites/toy.yaml}`."""
    return {p.stem: p for p in sorted(PACKAGED.glob("*.yaml"), key=lambda p: p.stem)}


def suite_arg(arg: str) -> str:
    """A `--suite` (or `saebench run`) argument as a path to collect: a path as given, a
    bare name such as `toy` (or `toy::resid-L2-topk16`) as that packaged suite's file.

        >>> suite_arg("toy")
        '/.../site-packages/saebench/suites/toy.yaml'
    """
    path, sep, node = arg.partition("::")
    if Path(path).exists() or "/" in path or Path(path).suffix in SUITE_SUFFIXES:
        return arg
    packaged = packaged_suites()
    if path not in packaged:
        raise pytest.UsageError(f"suite {path!r}: no such file, nor a packaged suite (the "
                                f"package has: {', '.join(packaged) or 'none'})")
    return f"{packaged[path]}{sep}{node}"


def suite_dirs(config: pytest.Config) -> list[Path]:
    """The configured `saebench_suite_dirs`, else `suites/` under the invocation directory."""
    dirs = config.getini("saebench_suite_dirs") or [config.invocation_params.dir / "suites"]
    return [Path(d).resolve() for d in dirs]


_EXPLICIT = pytest.StashKey[tuple[tuple[str, ...], set[Path]]]()


def explicit_paths(config: pytest.Config) -> set[Path]:
    """The paths given on the command line (or by `--suite`), without any `::node` suffix;
    computed once per set of arguments (pytest asks for every file it collects)."""
    args = tuple(config.args)
    cached = config.stash.get(_EXPLICIT, None)
    if cached is None or cached[0] != args:
        cached = (args, {Path(arg.split("::")[0]).resolve() for arg in args})
        config.stash[_EXPLICIT] = cached
    return cached[1]


def selects_suites(config: pytest.Config) -> bool:
    """Whether the session's `-m` expression can select a suite check (marked `eval`): a
    plain `pytest` of the unit tests (`-m 'not eval'`) then never reads, nor loads, a suite
    under the suite directories, so a broken suite there cannot break it."""
    from _pytest.mark.expression import Expression

    expression = config.getoption("markexpr", "") or ""
    if not expression:
        return True
    try:
        return Expression.compile(expression).evaluate(lambda name, **_: name == "eval")
    except Exception:  # noqa: BLE001 -- a bad expression is pytest's to report
        return True


def is_suite_file(file_path: Path, config: pytest.Config) -> bool:
    """A `.yaml`/`.yml` file given explicitly, or lying under one of the suite directories
    when the session's `-m` expression can select suite checks (`selects_suites`)."""
    if file_path.suffix not in SUITE_SUFFIXES:
        return False
    if file_path.resolve() in explicit_paths(config):
        return True
    absolute = Path(os.path.abspath(file_path))  # a link under a suite dir is a suite there
    return selects_suites(config) and any(absolute.is_relative_to(d) for d in suite_dirs(config))


def _is_saebench_dest(dest: str) -> bool:
    return dest == "suite" or dest.startswith("saebench_")


def _value_option_strings(parser: pytest.Parser) -> set[str]:
    """The option strings of the saebench options that take a value, read from the parser."""
    actions: Iterable[argparse.Action] = getattr(getattr(parser, "optparser", None),
                                                 "_actions", ())
    return {name for action in actions
            if _is_saebench_dest(action.dest) and action.nargs != 0
            for name in action.option_strings}


def _mistaken_for_paths(parser: pytest.Parser, args: list[str]) -> bool:
    """Whether a saebench option has its value as the next argument (`--opt VALUE`).

    Before our options were known, pytest's first parse took that VALUE for a test path.
    """
    names = _value_option_strings(parser)
    return any(arg in names for arg in args[:-1])


# pytest's own `pytest_load_initial_conftests` (trylast) finds the initial conftests from the
# rootdir; this one runs first and, where the rootdir decision was misled by one of our option
# values, redoes it with the complete parser. It uses pytest internals (checked on pytest 9.2)
# and does nothing where they are missing, so collection then still follows `is_suite_file`.
_CONFIG_ATTRS = ("_rootpath", "_inipath", "_inicfg", "_inicache", "_parser",
                 "known_args_namespace")


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config, parser: pytest.Parser,
                                  args: list[str]) -> None:
    config = early_config
    if not _mistaken_for_paths(parser, args):
        return
    if not all(hasattr(config, attr) for attr in _CONFIG_ATTRS):
        return
    try:
        from _pytest.config.findpaths import determine_setup, parse_override_ini

        ns = parser.parse_known_args(args, namespace=copy.copy(config.option))
        rootpath, inipath, inicfg, ignored = determine_setup(
            inifile=ns.inifilename, override_ini=ns.override_ini, args=ns.file_or_dir,
            rootdir_cmd_arg=ns.rootdir or None, invocation_dir=config.invocation_params.dir)
    except (ImportError, AttributeError, TypeError, ValueError):
        return  # another pytest version: leave its decision alone
    if (rootpath, inipath) == (config.rootpath, config.inipath):
        return  # the value was no existing path, or this hook already ran
    config._rootpath, config._inipath, config._inicfg = rootpath, inipath, inicfg
    config._ignored_config_files = ignored
    config._inicache.clear()
    config._parser.extra_info.update(rootdir=str(rootpath), inifile=str(inipath))
    # As pytest's own parse does: the real ini's addopts go first, their -o overrides apply,
    # and confcutdir defaults to the ini's directory.
    args[:] = [*config.getini("addopts"), *args]
    ns = parser.parse_known_args(args, namespace=copy.copy(config.option))
    config._inicfg.update(parse_override_ini(ns.override_ini))
    config._inicache.clear()
    if ns.confcutdir is None:
        ns.confcutdir = str(inipath.parent if inipath is not None else rootpath)
    config.known_args_namespace = ns

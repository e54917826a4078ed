"""Suite discovery and the rootdir repair for space-separated saebench option values.

Each test runs pytest in a subprocess (the rootdir is decided at startup, which an in-process
run would not reproduce faithfully) in a small project: a `pyproject.toml`, suite files, and
a stand-in plugin that registers the real saebench options and the discovery hook exactly as
`saebench.plugin` does, but collects one trivial item per suite file instead of real checks.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

STANDIN = """\
import pytest

from saebench.discovery import is_suite_file, pytest_load_initial_conftests  # noqa: F401
from saebench.plugin import pytest_addoption  # noqa: F401


class Check(pytest.Item):
    def runtest(self):
        pass


class Suite(pytest.File):
    def collect(self):
        item = Check.from_parent(self, name="check")
        item.add_marker(pytest.mark.eval)
        yield item


def pytest_collect_file(file_path, parent):
    if is_suite_file(file_path, parent.config):
        return Suite.from_parent(parent, path=file_path)
    return None
"""
# The real plugin (an installed entry point) is blocked: it would register the same options
# and collect the suite files as real suites.
PLUGIN_ARGS = ("-p", "no:saebench.plugin", "-p", "saebench_standin", "-p", "no:cacheprovider")


def pyproject(**ini: str) -> str:
    lines = [f"{key} = {value}" for key, value in ini.items()]
    return "[tool.pytest.ini_options]\n" + "\n".join(lines) + "\n"


BASE_INI = {
    "testpaths": '["suites"]',
    "markers": '["eval: a suite check"]',
    "addopts": "\"-v -m 'not eval' --strict-markers\"",
}


@pytest.fixture
def project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project whose ini has testpaths, markers and addopts, with two suites."""
    monkeypatch.setenv("PYTHONPATH", str(pytester.path))  # the stand-in, from any cwd
    pytester.makepyfile(saebench_standin=STANDIN)
    pytester.makefile(".toml", pyproject=pyproject(**BASE_INI))
    for name in ("suites/a.yaml", "suites/b.yml", "other/z.yaml"):
        (pytester.path / name).parent.mkdir(exist_ok=True)
        (pytester.path / name).write_text("suite: stand-in\n")
    # Outside testpaths: collected only if the ini's testpaths were lost.
    pytester.makepyfile(test_outside="def test_outside():\n    raise AssertionError\n")
    return pytester.path


@pytest.fixture
def outside_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An existing directory outside the project, as a report directory usually is."""
    return tmp_path_factory.mktemp("reports")


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess(*PLUGIN_ARGS, *args)


def assert_project_setup(result: pytest.RunResult, root: Path,
                         testpaths: str | None = "suites") -> None:
    """The project's rootdir and ini were used, with its testpaths, and its addopts (-v)."""
    header = [f"rootdir: {root}", "configfile: pyproject.toml"]
    result.stdout.fnmatch_lines([*header, f"testpaths: {testpaths}"] if testpaths else header)
    assert "test_outside" not in result.stdout.str()


@pytest.mark.parametrize("option", ["--saebench-report-dir", "--saebench-resume"])
def test_space_separated_value_keeps_rootdir_ini_and_suites(pytester, project, outside_dir,
                                                            option):
    result = run(pytester, "-m", "eval", option, str(outside_dir))
    assert_project_setup(result, project)
    result.stdout.fnmatch_lines(["suites/a.yaml::check PASSED*", "suites/b.yml::check PASSED*"])
    result.assert_outcomes(passed=2)


def test_equals_form_keeps_rootdir_ini_and_suites(pytester, project, outside_dir):
    result = run(pytester, "-m", "eval", f"--saebench-report-dir={outside_dir}")
    assert_project_setup(result, project)
    result.assert_outcomes(passed=2)


def test_suite_dirs_from_ini(pytester, project, outside_dir):
    ini = {**BASE_INI, "testpaths": '["suites", "checks"]', "saebench_suite_dirs": '["checks"]'}
    pytester.makefile(".toml", pyproject=pyproject(**ini))
    (project / "checks").mkdir()
    (project / "checks" / "c.yaml").write_text("suite: stand-in\n")
    result = run(pytester, "-m", "eval", "--saebench-report-dir", str(outside_dir))
    assert_project_setup(result, project, testpaths="suites, checks")
    result.stdout.fnmatch_lines(["checks/c.yaml::check PASSED*"])
    result.assert_outcomes(passed=1)  # suites/ is no suite directory once others are set


def test_run_from_subdirectory_uses_its_suites(pytester, project, outside_dir):
    sub = project / "sub"
    (sub / "suites").mkdir(parents=True)
    (sub / "suites" / "s.yaml").write_text("suite: stand-in\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(sub)
        result = run(pytester, "-m", "eval", "--saebench-report-dir", str(outside_dir))
    result.stdout.fnmatch_lines([f"rootdir: {project}", "configfile: pyproject.toml",
                                 "suites/s.yaml::check PASSED*"])
    result.assert_outcomes(passed=1)


def test_plain_run_is_unchanged(pytester, project):
    result = run(pytester)
    assert_project_setup(result, project)  # the ini's `-m 'not eval'` selects no suite check
    result.stdout.fnmatch_lines(["*collected 0 items*"])  # suites are not even read
    result = run(pytester, "-m", "eval", "other/z.yaml::check", "suites/a.yaml")
    result.stdout.fnmatch_lines(["other/z.yaml::check PASSED*", "suites/a.yaml::check PASSED*"])
    result.assert_outcomes(passed=2)


def test_explicit_suite_outside_the_suite_dirs(pytester, project, outside_dir):
    # pytest finds the ini from the explicit path by itself here: the hook sees the mistaken
    # value but must leave the (right) setup alone.
    result = run(pytester, "-m", "eval", "--saebench-report-dir", str(outside_dir),
                 "other/z.yaml::check")
    assert_project_setup(result, project, testpaths=None)  # paths given: no testpaths
    result.stdout.fnmatch_lines(["other/z.yaml::check PASSED*"])
    result.assert_outcomes(passed=1)


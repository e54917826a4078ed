"""Progress of a suite's computation on pytest's terminal, outside its output capture.

A group (one dictionary or spliced set) is computed when its first check runs; while it is,
one live line names the group and the engine's batches, and a line saying what was computed
in how long stays when it is done:

    saebench ▸ resid-L2-topk16: 19 checks computed in 4.1 s

Live updates need a terminal; `mode="on"` elsewhere (a CI log) writes only the final lines.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

MODES = ("auto", "on", "off")
"""`--saebench-progress`: on in a terminal (auto), always, or never."""


class GroupProgress:
    """Writes the progress lines of suite groups through pytest's terminal reporter."""

    def __init__(self, config: pytest.Config, mode: str) -> None:
        self._config = config
        self._mode = mode

    @functools.cached_property
    def _reporter(self) -> Any:
        return self._config.pluginmanager.get_plugin("terminalreporter")

    @functools.cached_property
    def live(self) -> bool:
        """Whether the line is updated in place (a terminal, and progress not off)."""
        return self._mode != "off" and self._reporter is not None and self._reporter.isatty()

    @property
    def enabled(self) -> bool:
        return self._reporter is not None and (self._mode == "on" or self.live)

    @contextlib.contextmanager
    def group(self, label: str, n_checks: int, nodeid: str) -> Iterator[Callable[[str], None]]:
        """Show the computation of one group while the item `nodeid` runs; yields a
        callback taking a status text."""
        if not self.enabled:
            yield lambda text: None
            return
        head = f"saebench ▸ {label}: {n_checks} check{'s' * (n_checks != 1)}"
        started = time.perf_counter()
        self._write(lambda: self._start(head, nodeid))

        def status(text: str) -> None:
            if self.live:
                self._write(lambda: self._reporter.rewrite(f"{head} · {text}", erase=True))

        try:
            yield status
        except BaseException:
            self._write(lambda: self._end(f"{head} · stopped", nodeid))
            raise
        self._write(lambda: self._end(
            f"{head} computed in {time.perf_counter() - started:.1f} s", nodeid))

    def _start(self, head: str, nodeid: str) -> None:
        """Begin the group's line: over the current one in a terminal when it holds only
        the item's prefix (its file, or its id with -v), on a new line otherwise."""
        reporter = self._reporter
        width = reporter._tw.width_of_current_line
        prefix = os.path.relpath(reporter.config.rootpath / nodeid.split("::")[0],
                                 reporter.startpath)
        if width and not (self.live and (reporter.verbosity > 0 or width == len(prefix) + 1)):
            reporter.line("")
        reporter.currentfspath = None
        if self.live:
            reporter.rewrite(f"{head} · starting", erase=True)

    def _end(self, line: str, nodeid: str) -> None:
        """The group's final line, then the item's prefix anew for its result (-v writes
        the prefix itself, -q has none)."""
        reporter = self._reporter
        if self.live:
            reporter.rewrite(line, erase=True)
        else:
            reporter.write(line)
        reporter.currentfspath = None
        if reporter.verbosity <= 0:
            if reporter.showfspath:
                reporter.write_fspath_result(nodeid, "")
            else:
                reporter.line("")

    def _write(self, write: Callable[[], None]) -> None:
        capture = self._config.pluginmanager.get_plugin("capturemanager")
        manager = (capture.global_and_fixture_disabled() if capture is not None
                   else contextlib.nullcontext())
        with manager:
            write()
            self._reporter.flush()

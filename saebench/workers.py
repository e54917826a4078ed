"""pytest-xdist workers: the device each one runs on, and a warning where they share one.

xdist pays off only with a device per worker: each worker loads the model and computes
every check alone (a serial run computes a dictionary's checks together), so on a CPU, or
with fewer GPUs than workers, it is slower than a serial run. With `--saebench-device cuda`
(or the default) on several GPUs, worker `gwN` runs on `cuda:{N % n_gpus}`;
`--saebench-devices cuda:0,cuda:2` deals the listed devices out round robin instead. Each
check carries its prefix group as an `xdist_group` mark, and with `--dist loadgroup` a
group's checks go to one worker, which computes their clean prefix once:

    pytest -m eval -n 4 --dist loadgroup --saebench-devices cuda:0,cuda:1,cuda:2,cuda:3

xdist's own grouping renames node ids, which pytest >= 9.2 ignores (pytest-xdist issue
1386), so saebench schedules `loadgroup` itself (`GroupScheduling`): the workers write
which group each check's node id belongs to into the run directory when they collect
(`GROUPS_FILE`), and the controller reads it when it deals the work out.

This module imports torch only when it must count devices.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest

from saebench.discovery import SUITE_SUFFIXES, selects_suites, suite_dirs

GROUPS_FILE = ".xdist-groups.json"
"""Node id -> prefix group of every collected check, written by the xdist workers."""


def write_groups(run_dir: Path, groups: dict[str, str]) -> None:
    """Record the prefix group of each check's node id for the controller's scheduler."""
    from saebench.results import atomic_write

    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(run_dir / GROUPS_FILE, json.dumps(groups))


def group_scheduler(run_dir: Path) -> type:
    """An xdist `LoadGroupScheduling` whose scope of a check is its prefix group as the
    workers recorded it in `run_dir` (other tests are grouped as xdist groups them)."""
    from xdist.scheduler import LoadGroupScheduling

    class GroupScheduling(LoadGroupScheduling):
        groups: dict[str, str] | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self.groups is None:
                path = run_dir / GROUPS_FILE
                self.groups = json.loads(path.read_text()) if path.is_file() else {}
            group = self.groups.get(nodeid)
            return f"saebench:{group}" if group else super()._split_scope(nodeid)

    return GroupScheduling


class SaebenchWarning(UserWarning):
    """A warning of saebench's about how a run is set up (filter it as
    `saebench.workers.SaebenchWarning`)."""


def device_list(text: str) -> list[str]:
    """The devices of `--saebench-devices`: `"cuda:0, cuda:1"` -> ["cuda:0", "cuda:1"]."""
    return [d.strip() for d in text.split(",") if d.strip()]


def listed_device(devices: list[str], worker_id: str | None) -> str:
    """The device of xdist worker `worker_id` (`gwN`) among `devices`, round robin: the N-th
    modulo their number; the first outside xdist.

        >>> listed_device(["cuda:0", "cuda:1"], "gw3")
        'cuda:1'
    """
    match = re.fullmatch(r"gw(\d+)", worker_id or "")
    return devices[int(match[1]) % len(devices) if match else 0]


def device(config: pytest.Config) -> str | None:
    """The device this process runs suites on: its share of `--saebench-devices`, else
    `--saebench-device`, or on an xdist worker with several CUDA devices its own one
    (`worker_device`)."""
    requested = config.getoption("--saebench-device")
    worker = getattr(config, "workerinput", None)
    listed = config.getoption("--saebench-devices")
    if listed is not None:
        return listed_device(device_list(listed), worker and worker["workerid"])
    if worker is None or requested not in (None, "cuda"):
        return requested
    import torch

    n_cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return worker_device(requested, worker["workerid"], n_cuda)


def worker_device(requested: str | None, worker_id: str | None, n_cuda: int) -> str | None:
    """The device of xdist worker `worker_id` (`gwN`): `cuda:{N % n_cuda}` when CUDA is asked
    for, or is the default, and there are several devices; else `requested`, as given."""
    match = re.fullmatch(r"gw(\d+)", worker_id or "")
    if match is None or requested not in (None, "cuda") or n_cuda < 2:
        return requested
    return f"cuda:{int(match[1]) % n_cuda}"


def warn_if_shared(config: pytest.Config) -> None:
    """On an xdist controller, warn before the run when its workers would share a device, where
    xdist is slower than a serial run; decided from the arguments, as the controller does not
    collect (and only then imports torch, to count devices)."""
    n_workers = _xdist_workers(config)
    if not n_workers or config.getoption("collectonly") or not _may_collect_suites(config):
        return
    listed = config.getoption("--saebench-devices")
    if listed is not None:
        distinct = list(dict.fromkeys(device_list(listed)))
        shared = (None if len(distinct) >= n_workers else
                  f"{len(distinct)} device(s) ({', '.join(distinct)}) for {n_workers} workers")
    else:
        import torch

        n_cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
        shared = shared_device(config.getoption("--saebench-device"), n_workers, n_cuda,
                               torch.backends.mps.is_available())
    if shared is not None:
        warnings.warn(SaebenchWarning(
            f"the xdist workers share {shared}: xdist is slower there, as each worker loads "
            "the model and computes every check on its own. A serial run (no -n), or a GPU "
            "per worker (-n N --saebench-device cuda on N GPUs), is what pays off."),
            stacklevel=1)


def _xdist_workers(config: pytest.Config) -> int:
    """How many xdist workers this process starts: 0 without xdist, and on a worker."""
    if (hasattr(config, "workerinput") or not config.pluginmanager.hasplugin("xdist")
            or config.getoption("dist", "no") == "no"):
        return 0
    specs = (spec.partition("*") for spec in config.getoption("tx", None) or [])
    return sum(int(count) if sep else 1 for count, sep, _ in specs)


def _may_collect_suites(config: pytest.Config) -> bool:
    """Whether the session's arguments reach a suite, judged without collecting: a YAML file
    among them, or a suite directory overlapping them while `eval` is selectable."""
    args = [(config.invocation_params.dir / arg.split("::")[0]).resolve() for arg in config.args]
    if any(arg.suffix in SUITE_SUFFIXES for arg in args):
        return True
    return selects_suites(config) and any(
        d.is_dir() and (d.is_relative_to(arg) or arg.is_relative_to(d))
        for d in suite_dirs(config) for arg in args)


def shared_device(requested: str | None, n_workers: int, n_cuda: int,
                  mps: bool) -> str | None:
    """What `n_workers` xdist workers share, as the warning names it ("one device (cpu)", "1
    CUDA device for 2 workers"); None when each has a device of its own, or the device is
    missing (collection then says so)."""
    device = requested or ("cuda" if n_cuda else "mps" if mps else "cpu")
    if device == "cpu":
        return "one device (cpu)"
    count = {"cuda": n_cuda, "mps": int(mps)}.get(device, min(n_cuda, 1))
    if not 0 < count < n_workers:
        return None
    kind = "MPS" if device == "mps" else "CUDA"
    named = f" ({device})" if ":" in device else ""
    return f"{count} {kind} device{'s' if count > 1 else ''}{named} for {n_workers} workers"

"""pytest-xdist workers: a device per worker, and what the shared-device warning names."""

from __future__ import annotations

import pytest

from saebench.workers import device_list, listed_device, shared_device, worker_device

pytest_plugins = ["pytester"]


@pytest.mark.parametrize(("requested", "worker_id", "n_cuda", "expected"), [
    ("cuda", "gw0", 4, "cuda:0"),
    ("cuda", "gw5", 4, "cuda:1"),
    (None, "gw3", 2, "cuda:1"),  # CUDA is the default where there is one
    ("cuda:2", "gw1", 4, "cuda:2"),  # an explicit index is kept
    ("cpu", "gw1", 4, "cpu"),
    ("cuda", "gw1", 1, "cuda"),  # one device: every worker shares it
    (None, "gw1", 0, None),
    ("cuda", None, 4, "cuda"),  # not an xdist worker
])
def test_each_xdist_worker_gets_a_gpu_of_its_own(requested, worker_id, n_cuda, expected):
    assert worker_device(requested, worker_id, n_cuda) == expected


@pytest.mark.parametrize(("requested", "n_workers", "n_cuda", "mps", "expected"), [
    (None, 2, 0, False, "one device (cpu)"),
    ("cpu", 1, 4, False, "one device (cpu)"),
    (None, 2, 1, False, "1 CUDA device for 2 workers"),
    ("cuda", 4, 2, False, "2 CUDA devices for 4 workers"),
    ("cuda:1", 2, 4, False, "1 CUDA device (cuda:1) for 2 workers"),
    (None, 2, 0, True, "1 MPS device for 2 workers"),
    ("cuda", 4, 4, False, None),  # a GPU per worker
    ("cuda", 2, 0, False, None),  # no CUDA: collection says so
])
def test_the_xdist_warning_names_the_shared_device(requested, n_workers, n_cuda, mps,
                                                   expected):
    assert shared_device(requested, n_workers, n_cuda, mps) == expected


@pytest.mark.parametrize(("devices", "worker_id", "expected"), [
    ("cuda:0,cuda:1", "gw0", "cuda:0"),
    ("cuda:0,cuda:1", "gw3", "cuda:1"),
    ("cuda:2, cuda:0, cuda:1", "gw4", "cuda:0"),
    ("cuda:1,cuda:3", None, "cuda:1"),  # not an xdist worker: the first
])
def test_listed_devices_are_dealt_round_robin(devices, worker_id, expected):
    assert listed_device(device_list(devices), worker_id) == expected


@pytest.mark.parametrize(("args", "message"), [
    (["--saebench-devices", "cuda:0,gpu1"], "--saebench-devices 'cuda:0,gpu1': expected"),
    (["--saebench-devices", " , "], "expected a comma-separated list"),
    (["--saebench-devices", "cpu", "--saebench-device", "cpu"], "give one"),
])
def test_bad_device_lists_are_usage_errors(pytester, args, message):
    out = pytester.runpytest_inprocess(*args)
    assert out.ret == pytest.ExitCode.USAGE_ERROR
    assert message in out.stderr.str()

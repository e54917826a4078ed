"""pytest-xdist workers: a device per worker, and what the shared-device warning names."""

from __future__ import annotations

import pytest

from saebench.workers import shared_device, worker_device


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

"""Shared fixtures: the packaged zoo, loaded once per session."""

from __future__ import annotations

import pytest
import torch
from toys import MINI_SUITE, run_suite

# matplotlib is imported once for the session: pytester's in-process runs drop the modules
# first imported inside them, and a second import of matplotlib mixes two copies of its
# classes (`Figure(...)` then fails in `normalize_kwargs`).
import saebench.plots  # noqa: F401
from saebench import loading


@pytest.fixture(scope="session")
def zoo_model():
    """The zoo model on CPU in float32."""
    return loading.load_zoo_model()


@pytest.fixture(scope="session")
def zoo_manifest() -> dict:
    """The packaged zoo's manifest."""
    return loading.zoo_manifest()


@pytest.fixture
def no_grad_one_thread():
    """No autograd and one torch thread (tiny models run faster on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.no_grad():
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def mini_serial(tmp_path_factory):
    """The mini suite run serially: its run directory."""
    where = tmp_path_factory.mktemp("mini")
    (where / "mini.yaml").write_text(MINI_SUITE)
    run_suite(where, "serial")
    (run_dir,) = (where / "serial").iterdir()
    return run_dir

"""A tiny zoo, built once for the zoo tests (seconds)."""

from __future__ import annotations

import pytest

from saebench.zoo.build import BuildSettings, build


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory):
    """(directory, manifest) of a zoo built with `BuildSettings.tiny()`."""
    out = tmp_path_factory.mktemp("zoo")
    manifest = build(out, BuildSettings.tiny())
    return out, manifest

"""Fixtures for the agent tests: one cluster on disk with hosts hv-a, hv-b, hv-c, and a rogue cluster."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_helpers import short_dir

from secmig.security import Cluster


@pytest.fixture(scope="session")
def cluster_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cluster with members hv-a, hv-b, hv-c."""
    root = tmp_path_factory.mktemp("agent-cluster") / "c"
    cluster = Cluster.create(root, name="agents")
    for host in ("hv-a", "hv-b", "hv-c"):
        cluster.join(host)
    return root


@pytest.fixture
def cluster(cluster_dir: Path) -> Cluster:
    """The shared test cluster."""
    return Cluster(cluster_dir)


@pytest.fixture
def base() -> Iterator[Path]:
    """A short per-test directory for sockets and state."""
    d = short_dir()
    yield d
    shutil.rmtree(d, ignore_errors=True)

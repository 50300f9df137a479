"""Fixtures for the security tests: a cluster on disk with three hypervisors, and a fresh migration setup."""

from __future__ import annotations

from pathlib import Path

import pytest
from security_helpers import Setup

from secmig.security import Cluster


@pytest.fixture(scope="session")
def cluster_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cluster with members hv-a, hv-b, hv-c, created once per session (keygen is cheap, disk is not)."""
    root = tmp_path_factory.mktemp("cluster") / "c"
    cluster = Cluster.create(root, name="test")
    for host, mac in (("hv-a", "02:00:00:00:00:0a"), ("hv-b", "02:00:00:00:00:0b"), ("hv-c", "02:00:00:00:00:0c")):
        cluster.join(host, [mac])
    return root


@pytest.fixture
def cluster(cluster_dir: Path) -> Cluster:
    """The shared test cluster."""
    return Cluster(cluster_dir)


@pytest.fixture
def setup(cluster: Cluster) -> Setup:
    """A fresh migration setup on the shared cluster."""
    return Setup(cluster)

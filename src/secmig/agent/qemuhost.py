"""QEMU VMs on an agent's host (being built)."""

from __future__ import annotations

import logging
from typing import Any

from secmig.agent.config import HostConfig
from secmig.agent.errors import AgentError


class QemuHost:
    """This host's QEMU processes."""

    def __init__(self, config: HostConfig, logger: logging.Logger) -> None:
        self.config = config
        self.logger = logger

    async def start_vm(self, name: str, spec: dict[str, Any]) -> Any:
        raise AgentError("the QEMU driver is not built yet")

    async def migrate(self, *args: Any) -> Any:
        raise AgentError("the QEMU driver is not built yet")

    async def receive(self, *args: Any) -> Any:
        raise AgentError("the QEMU driver is not built yet")

    async def close(self) -> None:
        return None

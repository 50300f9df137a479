"""The agent's local control API: JSON lines over a UNIX socket (mode 0600), and its client.

A request is one line ``{"op": "vm.list", "args": {...}}``; the answer is one line ``{"ok": true,
"result": ...}`` or ``{"ok": false, "error": {"kind": "AuthorizationError", "message": "..."}}``. The
client turns an error back into the exception of secmig's tree with that name, so ``secmig migrate``
fails with the same one-line error the agent saw. Operations: ``status``, ``vm.list``, ``vm.start``,
``vm.stop``, ``vm.binding``, ``migrate``, ``shutdown``. The server side lives in :mod:`.daemon`.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from secmig.errors import AgentError, AgentUnavailable, SecmigError, error_class


def error_from(kind: str, message: str) -> SecmigError:
    """The exception a control error stands for (AgentError when the kind is unknown)."""
    return (error_class(kind) or AgentError)(message)


class ControlClient:
    """Talks to one agent. ``await client.call("vm.list")``."""

    def __init__(self, socket_path: Path, timeout_s: float | None = 600.0) -> None:
        self.socket_path = socket_path
        self.timeout_s = timeout_s

    async def call(self, op: str, **args: Any) -> Any:
        """Send one request and return its result, or raise the agent's error."""
        try:
            reader, writer = await asyncio.open_unix_connection(str(self.socket_path), limit=1 << 20)
        except (FileNotFoundError, ConnectionRefusedError) as err:
            raise AgentUnavailable(f"no agent answers on {self.socket_path} (is `secmig agent run` running?)") from err
        except OSError as err:
            raise AgentUnavailable(f"{self.socket_path}: {err.strerror or err}") from err
        try:
            writer.write(json.dumps({"op": op, "args": args}).encode() + b"\n")
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), self.timeout_s)
        except (OSError, ConnectionError) as err:
            raise AgentUnavailable(f"{self.socket_path}: connection lost: {err}") from err
        except TimeoutError as err:
            raise AgentError(f"{op}: no answer from the agent in {self.timeout_s:.0f} s") from err
        finally:
            writer.close()
        if not line:
            raise AgentUnavailable(f"{self.socket_path}: the agent closed the connection (did it stop?)")
        try:
            response = json.loads(line)
        except ValueError as err:
            raise AgentError(f"{op}: unreadable answer from the agent") from err
        if response.get("ok"):
            return response.get("result")
        err_doc = response.get("error") or {}
        raise error_from(str(err_doc.get("kind", "")), str(err_doc.get("message", "unknown error")))

    def call_sync(self, op: str, **args: Any) -> Any:
        """:meth:`call` from synchronous code (the CLI)."""
        return asyncio.run(self.call(op, **args))

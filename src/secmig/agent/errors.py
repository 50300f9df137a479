"""Errors of the agents, as branches of secmig's one error tree.

::

    SecmigError
     ├── ConfigError            a bad host.yaml, VM spec or request argument (the CLI exits 2)
     ├── MigrationError         a migration failed; the VM keeps running on its source
     │    └── MigrationAborted  refused, cancelled, cut off or stopped by the monitor
     └── AgentError             the daemon or its control API failed
          ├── AgentUnavailable  nothing answers on the control socket
          ├── StateError        a call the agent's runstate (or a VM's state) does not allow now
          └── VMNotFound        no VM of that name on this host

Refusals by the security core arrive as its own errors (AuthenticationError, AuthorizationError, …),
which the control API carries by name to the CLI. Wrapped errors keep their cause
(``raise ... from err``); ``asyncio.CancelledError`` is never wrapped.
"""

from __future__ import annotations

from secmig.errors import SecmigError


class AgentError(SecmigError):
    """The agent daemon or its control API failed."""


class AgentUnavailable(AgentError):
    """No agent answers on the control socket (not running, or the path is wrong)."""


class StateError(AgentError):
    """The agent or a VM is not in a state that allows this call (QEMU's qmp ``StateError`` shape)."""


class VMNotFound(AgentError):
    """No VM of that name runs (or is stored) on this host."""

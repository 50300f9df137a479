"""One exception tree for the whole project.

::

    SecmigError
     ├── ConfigError            bad input: a scenario, a rule file, a CLI value (the CLI exits 2)
     │    └── UnitError         a size, rate or duration that does not parse
     ├── SimulationError        the simulator reached a state it cannot continue from
     ├── MigrationError         a migration failed; the VM stays on its source
     │    └── MigrationAborted  a policy or a peer aborted it on purpose
     ├── SecurityError          any refused security check (one opaque kind per check family)
     │    ├── AuthenticationError
     │    ├── AuthorizationError
     │    ├── IntegrityError
     │    └── AuditError
     ├── LocalProtocolError     we tried to do something the protocol forbids (our bug)
     └── RemoteProtocolError    the peer sent something the protocol forbids

Wrapped errors keep their cause (``raise ... from err``). ``asyncio.CancelledError`` is never wrapped.
"""

from __future__ import annotations


class SecmigError(Exception):
    """Root of every error secmig raises on purpose."""


class ConfigError(SecmigError):
    """Bad user input: names the file or option, the field and the value."""


class UnitError(ConfigError):
    """A quantity with a unit that does not parse or has the wrong dimension."""


class SimulationError(SecmigError):
    """The simulator cannot continue."""


class MigrationError(SecmigError):
    """A migration failed; the VM keeps running on its source."""


class MigrationAborted(MigrationError):
    """A migration was aborted on purpose (policy, monitor or peer)."""


class SecurityError(SecmigError):
    """A security check refused something."""


class AuthenticationError(SecurityError):
    """An identity could not be proved (certificate, Vsignature, binding)."""


class AuthorizationError(SecurityError):
    """An operation has no valid grant (missing, expired, replayed, wrong VM, host or operation)."""


class IntegrityError(SecurityError):
    """Data was altered: a page digest, a memory digest or an audit chain does not match."""


class AuditError(SecurityError):
    """The audit log cannot be written or read."""


class LocalProtocolError(SecmigError):
    """This side tried to do something the protocol state forbids."""


class RemoteProtocolError(SecmigError):
    """The peer sent something malformed or out of order."""

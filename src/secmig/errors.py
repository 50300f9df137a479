"""One exception tree for the whole project.

::

    SecmigError
     ├── ConfigError            bad input: a scenario, a rule file, a CLI value (the CLI exits 2)
     │    ├── UnitError         a size, rate or duration that does not parse
     │    ├── QemuNotFound      qemu-system-x86_64 is not installed (or not where it was said to be)
     │    └── GuestBuildError   the reference guest could not be built (no gcc, a compile error)
     │         └── GuestFetchError a Debian package the Linux guest needs could not be fetched
     ├── SimulationError        the simulator reached a state it cannot continue from
     ├── MigrationError         a migration failed; the VM stays on its source
     │    ├── MigrationAborted  a policy or a peer aborted it on purpose
     │    │    └── ChannelClosed the transport ended (EOF, reset, timeout) before the migration did
     │    └── QemuError         a QEMU process died, refused a QMP command or did not answer in time
     │         └── GuestError   the reference guest reported an error or never started its workload
     ├── AgentError             the agent daemon or its control API failed
     │    ├── AgentUnavailable  nothing answers on the control socket
     │    ├── StateError        a call the agent's runstate (or a VM's state) does not allow now
     │    ├── VMNotFound        no VM of that name on this host
     │    ├── HostNetError      a bridge, tap or tc operation failed (or needs root and we are not)
     │    └── ScrubError        a destroyed guest's RAM backing file could not be zeroed
     ├── SecurityError          any refused security check (one opaque kind per check family)
     │    ├── AuthenticationError
     │    ├── AuthorizationError
     │    │    └── RegisterConflict   the location register refuses: stale binding, transition decided otherwise
     │    ├── RegisterUnavailable    the location register did not answer (the caller stays paused, retries)
     │    ├── IntegrityError
     │    └── AuditError
     │    └── DocumentFormatError a signed document (credential, grant, binding) has the wrong shape
     ├── LocalProtocolError     we tried to do something the protocol forbids (our bug)
     └── RemoteProtocolError    the peer sent something the protocol forbids

The agents' control API carries an error by its class name; :func:`error_class` finds the class again by
walking this tree, so every error defined here crosses the socket as itself.

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


class ChannelClosed(MigrationAborted):
    """The transport ended (EOF, reset, timeout) before the migration did."""


class QemuNotFound(ConfigError):
    """No usable ``qemu-system-x86_64``: the message says how to install it."""


class GuestBuildError(ConfigError):
    """The reference guest kernel could not be built from its C source."""


class GuestFetchError(GuestBuildError):
    """A Debian package the Linux guest is built from could not be resolved or downloaded."""


class QemuError(MigrationError):
    """A QEMU process or its QMP monitor failed; the message carries the tail of QEMU's log."""


class GuestError(QemuError):
    """The reference guest did not reach its running state, or reported an error."""


class AgentError(SecmigError):
    """The agent daemon or its control API failed."""


class AgentUnavailable(AgentError):
    """No agent answers on the control socket (not running, or the path is wrong)."""


class StateError(AgentError):
    """The agent or a VM is not in a state that allows this call (QEMU's qmp ``StateError`` shape)."""


class VMNotFound(AgentError):
    """No VM of that name runs (or is stored) on this host."""


class HostNetError(AgentError):
    """Host networking (bridge = vSwitch, taps, tc) failed: the message names the command and its error."""


class ScrubError(AgentError):
    """The RAM backing file of a destroyed guest could not be zeroed (or did not read back as zeros)."""


class SecurityError(SecmigError):
    """A security check refused something."""


class AuthenticationError(SecurityError):
    """An identity could not be proved (certificate, Vsignature, binding)."""


class AuthorizationError(SecurityError):
    """An operation has no valid grant (missing, expired, replayed, wrong VM, host or operation)."""


class RegisterConflict(AuthorizationError):
    """The location register refuses: the binding is not the VM's current one, or the move was decided otherwise."""


class RegisterUnavailable(SecurityError):
    """The location register cannot be reached or did not answer: the outcome is unknown, so nothing resumes."""


class IntegrityError(SecurityError):
    """Data was altered: a page digest, a memory digest or an audit chain does not match."""


class AuditError(SecurityError):
    """The audit log cannot be written or read."""


class DocumentFormatError(SecurityError):
    """A signed document does not have the expected shape; callers say which file or message held it."""


class LocalProtocolError(SecmigError):
    """This side tried to do something the protocol state forbids."""


class RemoteProtocolError(SecmigError):
    """The peer sent something malformed or out of order."""


def error_class(name: str) -> type[SecmigError] | None:
    """The class of this tree called ``name`` (None when there is none), found by walking the subclasses."""
    stack: list[type[SecmigError]] = [SecmigError]
    while stack:
        cls = stack.pop()
        if cls.__name__ == name:
            return cls
        stack.extend(cls.__subclasses__())
    return None

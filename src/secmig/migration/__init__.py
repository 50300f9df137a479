"""Migration strategies as sans-IO state machines, shared by the simulator and the real agents.

Told "this round is finished and this many pages are dirty", a strategy answers with what to do next:
send a round, stop the VM and copy the rest, done, or abort. It never sends a byte itself, and keeps
no clock: times are what the driver reports.

- :mod:`.policy` — when the live rounds stop (QEMU, Xen and the paper's presets).
- :mod:`.precopy` — the strategies, their actions and the phase table.
- :mod:`.result` — what one migration did, as drivers report it.
"""

from secmig.migration.policy import POLICY_PRESETS, StopPolicy, policy_preset
from secmig.migration.precopy import (
    AbortMigration,
    AutoConverge,
    Finished,
    MigrationStrategy,
    Phase,
    PostCopyMigration,
    PostCopyPush,
    PreCopyMigration,
    RoundRecord,
    SendRound,
    StopAndCopyMigration,
    StopAndCopyRound,
    StopReason,
)

__all__ = [
    "POLICY_PRESETS",
    "AbortMigration",
    "AutoConverge",
    "Finished",
    "MigrationStrategy",
    "Phase",
    "PostCopyMigration",
    "PostCopyPush",
    "PreCopyMigration",
    "RoundRecord",
    "SendRound",
    "StopAndCopyMigration",
    "StopAndCopyRound",
    "StopPolicy",
    "StopReason",
    "policy_preset",
]

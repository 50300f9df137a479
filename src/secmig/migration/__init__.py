"""Migration strategies as sans-IO state machines, shared by the simulator and the real agents.

Told "this round is finished and this many pages are dirty", a strategy answers with what to do next:
send a round, stop the VM and copy the rest, done, or abort. It never sends a byte itself.
"""

from secmig.migration.policy import POLICY_PRESETS, StopPolicy, policy_preset
from secmig.migration.precopy import (
    AbortMigration,
    AutoConverge,
    Finished,
    MigrationStrategy,
    PostCopyMigration,
    PostCopyPush,
    PreCopyMigration,
    RoundRecord,
    SendRound,
    StopAndCopyMigration,
    StopAndCopyRound,
)

__all__ = [
    "POLICY_PRESETS",
    "AbortMigration",
    "AutoConverge",
    "Finished",
    "MigrationStrategy",
    "PostCopyMigration",
    "PostCopyPush",
    "PreCopyMigration",
    "RoundRecord",
    "SendRound",
    "StopAndCopyMigration",
    "StopAndCopyRound",
    "StopPolicy",
    "policy_preset",
]

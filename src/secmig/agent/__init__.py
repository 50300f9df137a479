"""Real agents: the per-host daemon that migrates in-memory and QEMU VMs with the security core.

Where each concept lives:

- :mod:`.daemon` — :class:`~secmig.agent.daemon.Agent`: TCP listener for migrations, control API server,
  tracking of migrations in flight, the audit log, the monitor loop and its actions, clean shutdown, and
  the bookkeeping after a commit (``vm.released``/``vm.received``, bindings, untrack) for every driver;
- :mod:`.driver` — the :class:`~secmig.agent.driver.VMDriver` interface, the narrow
  :class:`~secmig.agent.driver.DriverContext` drivers get instead of the daemon, the driver registry;
- :mod:`.drivers.memory`, :mod:`.drivers.qemu` — the two drivers (in-memory VM; QEMU with its relay and
  qemu-tls data planes, on the :mod:`.qemu` harness); :mod:`.memvm` — the in-memory VM itself;
- :mod:`.manifest` — round 0 of every migration: the driver's name and what the destination needs;
- :mod:`.precopy_driver` — the one pre-copy driver over the protocol (sans-IO core, asyncio and
  in-memory links), used by the in-memory driver, the attack lab and the protocol tests;
- :mod:`.channel` — the sans-IO migration protocol over asyncio streams (reader task, bounded queue);
- :mod:`.vocab` — enums: driver kinds, data planes;
- :mod:`.monitoring` — the monitor hook fed from byte counters; :mod:`.report` — the report of a
  migration (the shared :class:`~secmig.migration.result.MigrationResult` plus wire figures) and the
  live handle;
- :mod:`.config` — ``host.yaml``; :mod:`.control` — the JSON-lines control API client.
"""

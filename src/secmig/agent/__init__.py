"""Real agents: the per-host daemon that migrates in-memory and QEMU VMs with the security core.

- :mod:`.daemon` — :class:`~secmig.agent.daemon.Agent`: TCP listener for migrations, control API, monitor,
  clean shutdown; :mod:`.config` — ``host.yaml``; :mod:`.control` — the JSON-lines control API client;
- :mod:`.channel` — the sans-IO migration protocol over asyncio streams (reader task, bounded queue);
- :mod:`.memvm`, :mod:`.memmigrate` — the in-memory VM and its pre-copy over the channel;
- :mod:`.qemuhost` — QEMU VMs and their relay and qemu-tls data planes (on the :mod:`.qemu` harness);
- :mod:`.monitoring` — the monitor hook fed from byte counters; :mod:`.report` — results and handles;
- :mod:`.errors` — the agents' branch of the error tree.
"""

"""Real agents: drivers that run migrations on real processes (QEMU over QMP) rather than in the simulator."""

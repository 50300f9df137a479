"""The simulated cloud: capacities, cloudlets, power, and the decisions of dynamic consolidation.

CloudSim's power package split into pure pieces, decisions only — no clock, no I/O (the day's run, with
its clock and its migrations, is :mod:`secmig.lab.consolidation`):

- :mod:`.power` — SPECpower and linear power models, the energy of an interval;
- :mod:`.capacity` — hosts (PEs × MIPS, RAM, NIC, power) and VMs, admission, ΣC(i)/Nvm;
- :mod:`.cloudlets` — cloudlets under time-shared and space-shared schedulers;
- :mod:`.utilisation` — full, constant, stochastic and trace (PlanetLab) utilisation models;
- :mod:`.fleet` — hosts and VMs as arrays, where VMs run, how each host's CPU is shared (migrations cost
  10 % at both ends, over-subscription scales everyone down);
- :mod:`.overload` — THR, MAD, IQR, LR, LRR detection with CloudSim's safety parameters and 0.7 fallback;
- :mod:`.selection` — MMT, MC, MU, RS;
- :mod:`.planner` — one consolidation round: overload → selection → power-aware best-fit decreasing
  placement → underloaded hosts emptied (and so switched off);
- :mod:`.metrics` — energy, SLATAH, PDM, SLAV, ESV, shutdowns, as CloudSim prints them.
"""

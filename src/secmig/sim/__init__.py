"""The discrete-event simulator: a fluid network on SimPy, migrations and traffic as processes.

- :mod:`.network` — flows sharing links max-min fairly; :mod:`.topology` — hosts and datacenters as links.
- :mod:`.engine` — the runner: migrations drive :mod:`secmig.migration` strategies over the network.
- :mod:`.monitoring` — the traffic monitor attached to a run, clocked by simulated time.
- :mod:`.scenario` — scenario files to a :class:`~secmig.sim.engine.SimulationSpec`;
  :mod:`.predict` — one migration between two hosts, no file.

Nothing here prints, stores results or draws charts (``cli``, ``results`` and ``report`` do), and
nothing in a run reads the wall clock except to say how long the run took.
"""

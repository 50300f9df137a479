"""The lab: adversaries and experiments built from the simulator, the agents' protocol and the security core.

- :mod:`.attacks` — the attack suite: authentication attacks over the real protocol, detection attacks as
  monitored scenarios;
- :mod:`.experiment` — the paper's experiment (Table 6.1, Chart 1).

Nothing here is imported by the core: the lab sits above ``sim`` and ``agent`` and below ``results``,
``report`` and ``cli``.
"""

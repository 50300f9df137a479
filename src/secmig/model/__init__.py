"""The pure model: units, VMs, hosts, links, dirty-page models and the closed-form formulas. No I/O.

- :mod:`.units` — sizes, rates, durations; :mod:`.infra` — hosts, VMs, datacenters as data.
- :mod:`.dirty` — how many distinct pages a guest dirties over time.
- :mod:`.analytic` — the paper's equations and closed forms of pre-copy, independent of the strategies
  in :mod:`secmig.migration` so that the simulator can be checked against them.
"""

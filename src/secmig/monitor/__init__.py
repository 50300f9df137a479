"""The traffic monitor: samples in, verdicts out, with the paper's LOW/MEDIUM/HIGH policy as data.

It knows nothing of where samples come from (the simulator's flows, an agent's byte counters, Linux
interface counters) and acts only through the :class:`~secmig.monitor.actions.Responder` it is given.
"""

from secmig.monitor.monitor import TrafficMonitor, VMProfile
from secmig.monitor.rules import RuleSet, load_rules
from secmig.monitor.samples import Action, Level, TrafficSample, Verdict

__all__ = ["Action", "Level", "RuleSet", "TrafficMonitor", "TrafficSample", "VMProfile", "Verdict", "load_rules"]

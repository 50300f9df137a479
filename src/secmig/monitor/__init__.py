"""The traffic monitor: samples in, verdicts out, with the paper's LOW/MEDIUM/HIGH policy as data.

It knows nothing of where samples come from (the simulator's flows, an agent's byte counters, Linux
interface counters) and acts only through the :class:`~secmig.monitor.actions.Responder` it is given:

    enforcer = Enforcer(TrafficMonitor(load_rules(), profiles, vswitch_caps), responder, audit_log)
    enforcer.observe(TrafficSample(t, vm, vswitch, nbytes, rtt_s=rtt))   # as samples come
    enforcer.tick(now)                                                     # every rules.step_s
"""

from secmig.monitor.actions import Enforcer, Responder, carry_out
from secmig.monitor.monitor import TrafficMonitor, VMProfile
from secmig.monitor.rules import RuleSet, load_rules
from secmig.monitor.samples import Action, Level, TrafficSample, Verdict

__all__ = [
    "Action",
    "Enforcer",
    "Level",
    "Responder",
    "RuleSet",
    "TrafficMonitor",
    "TrafficSample",
    "VMProfile",
    "Verdict",
    "carry_out",
    "load_rules",
]

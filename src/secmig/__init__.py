"""secmig: secure, measurable live VM migration.

A simulator of live migration, the security model of Ramamoorthy & Rajalakshmi (Vsignature, operation
grants, pages released only to an authenticated destination, a traffic monitor with a self-destruct
policy) and real agents that migrate VMs with it. ``docs/architecture.md`` maps the layers and the modules,
and where each concept of the paper lives.
"""

__version__ = "0.1.0"

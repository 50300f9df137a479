"""The pure model: units, VMs, hosts, links, dirty-page models and the closed-form formulas. No I/O."""

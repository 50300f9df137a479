"""The discrete-event simulator: a fluid network on SimPy, migrations and traffic as processes."""

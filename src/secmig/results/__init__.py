"""Storage and export of run results: SQLite (one transaction a run), JSON and CSV."""

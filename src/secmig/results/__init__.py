"""Storage and export of run results: SQLite (one transaction a run), JSON and CSV.

- :mod:`~secmig.results.records` — the machinery: a table declared once as a frozen slotted dataclass
  (:class:`~secmig.results.records.Record`), its ``CREATE``/``INSERT``/``SELECT``, CSV export and rows read
  back made from that declaration.
- :mod:`~secmig.results.tables` — the tables of ``secmig.sqlite``: runs, migrations, rounds, link usage,
  flows, monitor events; rows made from the simulator's results by field name.
- :mod:`~secmig.results.store` — writing a run (one transaction), appending monitor verdicts, exporting a
  run as ``run.json`` and CSV files.

Sweeps keep their own table (:mod:`secmig.sweep.store`, same machinery); the report reads these tables
back (:mod:`secmig.report.data`).
"""

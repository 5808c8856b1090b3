"""``synthwatch ingest-history``: years of past reports loaded straight into ClickHouse.

Modules, in the order a load uses them: :mod:`.ingest` runs a load (``ingest_history``: the loop, the
counts, the worker pool); :mod:`.prepass` puts each distinct SMILES through RDKit once; :mod:`.parse`
turns a chunk of lines into rows in Python (worker processes), encoded by :mod:`.arrow` (typed columns)
or :mod:`.jsonrows` (the reference path), with :mod:`.quantities` and :mod:`.resolve` (substance identity
in file order); :mod:`.engine` has the embedded engine parse a chunk itself with the SQL of :mod:`.sql`;
:mod:`.store` moves a chunk's new rows into the raw tables. Imports only go down that list's dependencies:
``ingest`` imports the others, none imports ``ingest``.
"""

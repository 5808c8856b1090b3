"""The detection core: pure and synchronous (no Faust, no ClickHouse, no network).

Intake and identity, families, the region stage, spikes, novelty, alerting and the backtest. It may
import only the floor (``synthwatch.settings``, ``synthwatch.catalogue``, ``synthwatch.schemas``, ...).
"""

"""The detection core: pure and synchronous (no Faust, no ClickHouse, no network).

Intake and identity, families, the region stage, spikes, novelty, alerting and the backtest. It may
import only the floor (``synthwatch.settings``, ``synthwatch.catalogue``, ``synthwatch.schemas``, ...).

Its hot modules run compiled (mypyc) when ``make install`` built them from these very sources; otherwise
pure Python. See :mod:`synthwatch.stream_apps.detect.compiled`.
"""

from synthwatch.stream_apps.detect.compiled import install as _install_compiled

_install_compiled()

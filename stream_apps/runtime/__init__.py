"""The Faust side of the worker: transport, batches, checkpoints, metrics, the watchdog, web guards.
It may import the floor, ``detect``, ``storage`` and ``delivery``; only :mod:`synthwatch.stream_apps.app`
wires it together.
"""

"""Faust stream processors: validation, detectors, sinks and delivery."""

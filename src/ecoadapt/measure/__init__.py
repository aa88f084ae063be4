"""Measurements of a run: memory, environment (and, in later modules, energy and FLOPs)."""

"""The recipes behind each command (adapt, evaluate, sweep, demo): named steps over the layers
below. The public API (``ecoadapt.adapt`` and friends) and the CLI call these.
"""

"""Training: the run's set-up, THE loop (``loop``), held-out evaluation of the language-modelling
objective, checkpoints, stopping rules and signals.
"""

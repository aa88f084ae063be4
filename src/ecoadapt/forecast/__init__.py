"""Forecasts of a recipe's memory, time and energy: from trial steps on this device
(``ecoadapt plan``) or from a run's own first steps.
"""

"""Measurements of a run: energy meters and windows, peak memory, FLOPs and MFU, budgets, the
environment, and what a kWh means in CO2e. Each figure says whether it was measured or estimated.
"""

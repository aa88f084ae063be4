"""The ground floor: the one error type for bad input, files written safely, progress lines.

Imports nothing else of ecoadapt and no torch; every other layer may use it.
"""

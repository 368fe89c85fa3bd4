"""Aggregation of per-cell result files into the results table, comparison tables and thesis figures.

Kept import-light on purpose: ``summary`` and ``tables`` need only pandas; ``figures`` imports
matplotlib (Agg) and is imported only by the rules that draw.
"""

"""Influence functions and the solvers behind them.

May import: everything below it (base, products, linalg, kron).
"""

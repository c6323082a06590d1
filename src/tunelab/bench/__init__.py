"""Benchmarks: tunelab against a bare PyTorch (or reference) loop, measured in the same process.

Only ratios are reported as results; absolute numbers depend on the machine.
"""

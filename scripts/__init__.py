"""Benchmarks and checks (python -m ziggurat.scripts.<name>); nothing at run
time imports them.
"""

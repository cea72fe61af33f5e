"""Benchmarks behind ``shoprec bench ...`` (``make bench`` runs them all).

Each module exposes ``command`` (a typer command) that writes its JSON result to
``--out`` and prints a table; results are recorded in ``BENCHMARKS.md``.
Modules keep heavy imports inside their functions so the CLI starts fast.
"""

"""Compute targets: where a run executes. One protocol (base.py), one module per kind."""

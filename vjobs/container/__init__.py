"""The VM execution container: one job, one VM, one lifecycle (lifecycle.py)."""

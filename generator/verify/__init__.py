"""Verification against transformers: the checks (checks.py), the reference model (reference.py,
relayout.py) and the conformance table (conformance.py)."""

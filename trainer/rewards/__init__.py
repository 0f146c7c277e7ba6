"""Outcome verifiers: math answer equivalence and sandboxed code execution."""

"""Outcome verifiers: math answer equivalence and sandboxed code tests, scored in a process pool.

Public entry points: `verify_batch(items, *, timeout_s, workers) -> list[float]` and the long-lived
`VerifierPool(...).score(items) -> VerifyResult(scores, failures)`. Items are dicts
{"ability": "math"|"code", "response": str, "ground_truth": str | dict}.
"""

from fastprime.trainer.verifiers.pool import VerifierPool, VerifyResult, verify_batch

__all__ = ["VerifierPool", "VerifyResult", "verify_batch"]

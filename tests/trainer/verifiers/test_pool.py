"""VerifierPool and verify_batch: the public API, hostile math answers, malformed items, worker kills."""

import os
import signal
import threading
import time

import pytest

from fastprime.trainer.verifiers import VerifierPool, VerifyResult, verify_batch


def _math(response: str, gold: str) -> dict:
    return {"ability": "math", "response": response, "ground_truth": gold}


def test_verify_batch_scores_in_order():
    items = [
        _math(r"so the answer is \boxed{\frac{1}{2}}", "0.5"),
        _math(r"\boxed{3}", "4"),
        {
            "ability": "code",
            "response": "```python\nprint(int(input()) + 1)\n```",
            "ground_truth": '{"inputs": ["1"], "outputs": ["2"]}',
        },
        _math(r"\boxed{x^2+2x+1}", "(x+1)^2"),
    ]
    assert verify_batch(items, timeout_s=10.0, workers=2) == [1.0, 0.0, 1.0, 1.0]
    assert verify_batch([]) == []


def test_malformed_items_score_zero_and_are_counted():
    items = [
        "not a dict",
        {"ability": "chemistry", "response": "x", "ground_truth": "1"},
        {"ability": "math", "response": None, "ground_truth": "1"},
        {"ability": "math", "response": r"\boxed{1}", "ground_truth": 1},
        {"ability": "code", "response": "print(1)", "ground_truth": "{not json"},
        {"ability": "code", "response": "print(1)", "ground_truth": {"inputs": ["1"]}},
        _math("I am not sure.", "1"),
        _math(r"\boxed{1}", "1"),
    ]
    with VerifierPool(workers=1, timeout_s=10.0) as pool:
        result = pool.score(items)
    assert isinstance(result, VerifyResult)
    assert result.scores == [0.0] * 7 + [1.0]
    assert result.failures == {"malformed": 6, "no_answer": 1}


def test_constructor_rejects_bad_options():
    with pytest.raises(ValueError, match="workers"):
        VerifierPool(workers=0)
    with pytest.raises(ValueError, match="timeout_s"):
        VerifierPool(workers=1, timeout_s=0)


HOSTILE_MATH = {
    "power_tower": _math(r"\boxed{9^{9^{9}}}", "3"),
    "huge_factorial": _math(r"\boxed{10^{10^{10}}!}", "3"),
    "factorial_compare": _math(r"\boxed{(10^{7})! - (10^{7})!}", "1"),
    "huge_number": _math(r"\boxed{" + "9" * 200_000 + "}", "9"),
    "deep_braces": _math(r"\boxed{" + "{" * 20_000 + "1" + "}" * 20_000 + "}", "1"),
    "deep_fracs": _math("$" + r"\frac{1}{" * 300 + "2" + "}" * 300 + "$", "2"),
    "unicode_soup": _math("\\boxed{\U0001f642\u2211\u222b\u2248\u202e\u0000\ufffd}", "1"),
    "control_chars": _math("\x00\x01\x02 the answer is \x07\x1b[31m 5", "6"),
    "megabyte_prose": _math("word " * 200_000, "1"),
    "pi_injection": _math(r"\boxed{\pi + __import__('os').system('touch /tmp/fastprime_pwned')}", r"\pi"),
    "honest": _math(r"\boxed{\sqrt{2}}", r"\frac{2}{\sqrt{2}}"),
}


def test_hostile_math_all_scored_and_pool_survives():
    names = list(HOSTILE_MATH)
    with VerifierPool(workers=2, timeout_s=2.0) as pool:
        result = pool.score([HOSTILE_MATH[n] for n in names])
        got = dict(zip(names, result.scores))
        assert got == {n: (1.0 if n == "honest" else 0.0) for n in names}
        assert "crash" not in result.failures and "error" not in result.failures, result.failures
        assert result.failures.get("timeout", 0) >= 1  # the power tower cannot finish in 2 s
        # every worker that was killed has been replaced: the pool still scores normally
        assert pool.score([_math(r"\boxed{7}", "7")] * 4).scores == [1.0] * 4
    assert not os.path.exists("/tmp/fastprime_pwned")


def test_worker_killed_from_outside_counts_as_crash_and_is_replaced():
    with VerifierPool(workers=1, timeout_s=60.0) as pool:
        assert pool.score([_math(r"\boxed{1}", "1")]).scores == [1.0]  # the worker is up
        pid = pool._workers[0].proc.pid

        def kill_soon():
            time.sleep(1.0)
            os.kill(pid, signal.SIGKILL)

        killer = threading.Thread(target=kill_soon)
        killer.start()
        result = pool.score([_math(r"\boxed{9^{9^{9}}}", "3")])  # busy for far longer than 1 s
        killer.join()
        assert result.scores == [0.0]
        assert result.failures == {"crash": 1}
        assert pool.score([_math(r"\boxed{2}", "2")]).scores == [1.0]
        assert pool._workers[0].proc.pid != pid


def test_close_is_idempotent_and_stops_workers():
    pool = VerifierPool(workers=2, timeout_s=5.0)
    procs = [w.proc for w in pool._workers]
    pool.close()
    pool.close()
    assert all(p.poll() is not None for p in procs)
    with pytest.raises(RuntimeError, match="closed"):
        pool.score([_math(r"\boxed{1}", "1")])

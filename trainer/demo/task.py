"""The built-in demo task: multi-step integer arithmetic with worked solutions and a `\\boxed{}` answer.

A problem is a chain of 2-4 operations applied left to right to a start value, written as one expression
with the fewest parentheses that keep that order, e.g. `(7+5)*3-4`. Its worked solution has one line per
step and ends with the boxed answer:

    7+5=12
    12*3=36
    36-4=32
    \\boxed{32}

Sizes come from a feasibility probe (shared/docs/demo-notes.md): additive operands 1-20, multipliers 2-5
and every intermediate value in 0-200 keep the task learnable by a ~1M-parameter model in minutes on a CPU;
operands to 50 and values to 999 were several times slower to learn.
"""

from __future__ import annotations

import random
import zlib

DATA_SOURCE = "fastprime/arithmetic"
MIN_OPS, MAX_OPS = 2, 4
ADD_RANGE = (1, 20)
MUL_RANGE = (2, 5)
VALUE_RANGE = (0, 200)
START_RANGE = (1, 20)
# One problem in TEST_BUCKETS (by a hash of its text) is reserved for held-out sets.
TEST_BUCKETS = 8
# Every character a problem or a solution can contain; the demo tokenizer's vocabulary is built from it.
TASK_CHARS = "0123456789+-*=()\n\\boxed{}"


def _random_chain(rng: random.Random) -> tuple[int, list[tuple[str, int]]]:
    """Draw a start value and 2-4 (op, operand) steps whose running values all stay in VALUE_RANGE."""
    lo, hi = VALUE_RANGE
    while True:
        start = value = rng.randint(*START_RANGE)
        steps: list[tuple[str, int]] = []
        for _ in range(rng.randint(MIN_OPS, MAX_OPS)):
            # Retry a step a few times rather than the whole chain: most draws fit.
            for _attempt in range(20):
                op = rng.choice("+-*")
                operand = rng.randint(*(MUL_RANGE if op == "*" else ADD_RANGE))
                nxt = _apply(value, op, operand)
                if lo <= nxt <= hi:
                    steps.append((op, operand))
                    value = nxt
                    break
            else:
                break
        if len(steps) >= MIN_OPS:
            return start, steps


def _apply(value: int, op: str, operand: int) -> int:
    if op == "+":
        return value + operand
    if op == "-":
        return value - operand
    if op == "*":
        return value * operand
    raise ValueError(f"unknown operation {op!r}")


def format_problem(start: int, steps: list[tuple[str, int]]) -> str:
    """Write the chain as one expression evaluated in step order, e.g. 7, [+5, *3, -4] -> `(7+5)*3-4`."""
    expr, last_additive = str(start), False
    for op, operand in steps:
        if op == "*" and last_additive:
            expr = f"({expr})"
        expr = f"{expr}{op}{operand}"
        last_additive = op in "+-"
    return expr


def format_solution(start: int, steps: list[tuple[str, int]]) -> tuple[str, int]:
    """One `a<op>b=c` line per step and a final `\\boxed{answer}` line; returns (solution, answer)."""
    lines, value = [], start
    for op, operand in steps:
        nxt = _apply(value, op, operand)
        lines.append(f"{value}{op}{operand}={nxt}")
        value = nxt
    lines.append(f"\\boxed{{{value}}}")
    return "\n".join(lines), value


def problem_split(problem: str) -> str:
    """ "test" for the fixed 1/TEST_BUCKETS of all problems reserved for held-out sets, else "train".

    A stable hash of the text (not Python's salted `hash`) so the split is the same in every process.
    """
    return "test" if zlib.crc32(problem.encode()) % TEST_BUCKETS == 0 else "train"


def make_arithmetic_rows(n: int, *, seed: int, split: str = "train") -> list[dict]:
    """`n` distinct demo problems as PRIME/verl rows, deterministic in `seed` and `split`.

    Each row is `{"data_source": "fastprime/arithmetic", "prompt": [{"role": "user", "content": problem}],
    "ability": "math", "reward_model": {"style": "rule", "ground_truth": "<answer>"},
    "extra_info": {"solution": "<worked steps>\\n\\boxed{<answer>}"}}`.
    Problems are unique within the list. `split="test"` draws only from a fixed slice of the problem space
    that `split="train"` never draws from, so held-out rows never overlap training rows whatever the seeds;
    two calls with the same split and different seeds can share problems.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng = random.Random(f"{split}:{seed}")
    seen: set[str] = set()
    rows: list[dict] = []
    # The guard only stops a request larger than the problem space from looping forever.
    for _ in range(200 * n + 1000):
        if len(rows) == n:
            break
        start, steps = _random_chain(rng)
        problem = format_problem(start, steps)
        if problem in seen or problem_split(problem) != split:
            continue
        seen.add(problem)
        solution, answer = format_solution(start, steps)
        rows.append(
            {
                "data_source": DATA_SOURCE,
                "prompt": [{"role": "user", "content": problem}],
                "ability": "math",
                "reward_model": {"style": "rule", "ground_truth": str(answer)},
                "extra_info": {"solution": solution},
            }
        )
    if len(rows) < n:
        raise ValueError(
            f"could only draw {len(rows)} distinct {split} problems of the {n} asked (seed={seed})"
        )
    return rows

"""Sandbox CPU fairness: does an honest program keep its time limit while another worker's sandbox runs a
fork bomb whose children each start a new session?

Linux's autogroup already shares the CPU per session, and every sandbox is its own session, but a program can
call setsid() in each child and so become many sessions. The verifier puts all of a worker's sandboxes in one
cpu cgroup (where the machine has a writable cgroup v1 cpu hierarchy), which setsid() does not leave.
Reported: how many of the honest programs (about 1.7 s of one core alone, 2 s limit) passed.

Run: python benchmarks/bench_sandbox_fairness.py [--pairs 6]
"""

from __future__ import annotations

import argparse
import time

from fastprime.trainer.verifiers import VerifierPool
from fastprime.trainer.verifiers.code_sandbox import sandbox_cpu_group

BOMB = (
    "```python\nimport os\nfor _ in range(7):\n    if os.fork() == 0:\n        os.setsid()\n        break\n"
    "while True:\n    pass\n```"
)
HONEST = "```python\nx = 0\nfor i in range(40_000_000):\n    x += i\nprint(int(input()) * 2)\n```"
TESTS = {"inputs": ["3\n"], "outputs": ["6\n"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=6)
    args = parser.parse_args()
    items = []
    for _ in range(args.pairs):
        items += [{"ability": "code", "response": r, "ground_truth": TESTS} for r in (BOMB, HONEST)]
    with VerifierPool(workers=2, timeout_s=10.0, code_test_timeout_s=2.0) as pool:
        t0 = time.perf_counter()
        scores = pool.score(items).scores
    print(f"cpu cgroups: {'yes' if sandbox_cpu_group() else 'no'} (as seen by this process)")
    print(
        f"honest programs passed: {sum(scores[1::2]):.0f} / {args.pairs} in {time.perf_counter() - t0:.1f} s"
    )


if __name__ == "__main__":
    main()

"""One verifier worker process: `python -m fastprime.trainer.verifiers.worker READ_FD WRITE_FD MEMORY_MB`.

Started by `VerifierPool` as a fresh interpreter (not a fork of the trainer, which may hold CUDA state and
threads, and not multiprocessing's spawn, which would re-import the trainer's main script). It imports the
verifiers once and warms the math parser, says ("ready", pid), then answers ("task", id, ability, response,
ground_truth, code_test_timeout_s) with ("result", id, score, failure_kind_or_None) until its pipe closes. It
has no time limit of its own: the pool kills it (SIGKILL) when an answer takes too long.
"""

from __future__ import annotations

import logging
import os
import resource
import sys
from multiprocessing.connection import Connection


def _score(ability: str, response, ground_truth, code_test_timeout_s: float) -> tuple[float, str | None]:
    if ability == "math":
        from fastprime.trainer.verifiers.math_equal import score_math

        return score_math(response, ground_truth)
    from fastprime.trainer.verifiers.code_sandbox import SandboxLimits, score_code

    return score_code(response, ground_truth, limits=SandboxLimits(test_timeout_s=code_test_timeout_s))


def main(argv: list[str]) -> None:
    """Serve tasks on the two inherited pipe fds in `argv` until the pool closes them."""
    rfd, wfd, memory_mb = int(argv[0]), int(argv[1]), int(argv[2])
    if memory_mb > 0:
        # A runaway big-integer computation (10^{10^{10}}) fails with MemoryError instead of taking the node.
        limit = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    reader, writer = Connection(rfd, writable=False), Connection(wfd, readable=False)
    import fastprime.trainer.verifiers.code_sandbox  # noqa: F401 - warm imports before saying ready
    from fastprime.trainer.verifiers.math_equal import score_math

    # The first comparison loads the LaTeX parser and sympy's lazy modules (0.4 s of CPU, several seconds of
    # wall time on a busy host). Done here, it is not charged to the first item's time limit, which would
    # otherwise score an honest answer 0 as a time-out on every worker that replaces a killed one.
    score_math(r"\boxed{\frac{3}{\sqrt{3}}}", r"\sqrt{3}")
    writer.send(("ready", os.getpid()))
    while True:
        try:
            msg = reader.recv()
        except (EOFError, OSError):
            return
        _, task_id, ability, response, ground_truth, code_test_timeout_s = msg
        try:
            score, failure = _score(ability, response, ground_truth, code_test_timeout_s)
        except MemoryError:
            score, failure = 0.0, "memory"
        except Exception:
            logging.getLogger(__name__).exception("verifier error on a %s item", ability)
            score, failure = 0.0, "error"
        writer.send(("result", task_id, float(score), failure))


if __name__ == "__main__":
    main(sys.argv[1:])

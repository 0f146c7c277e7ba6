"""VerifierPool: score a batch of responses in parallel worker processes with hard per-answer time limits.

Time limits are enforced by killing the worker process (SIGKILL), never by signals inside it: signal-based
time-outs fail off the main thread and cannot interrupt C-level loops (a gmpy2 factorial, a huge power).
A killed or crashed worker is replaced, so the pool survives any answer, and its code sandboxes are killed
with it. Every item gets a score; a time-out, crash or malformed item scores 0 and is counted by kind:

  "timeout"   the answer exceeded its time limit (the worker was killed)
  "crash"     the worker died on its own (segfault, killed by the OS)
  "memory"    the worker ran out of its memory limit (MemoryError)
  "error"     the verifier raised (a bug, logged with its traceback) or the code sandbox could not start
  "malformed" the item itself is bad (not a dict, unknown ability, wrong field types, bad test spec)
  "no_answer" nothing to grade in the response (no answer, no code block)
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import pickle
import subprocess
import sys
import time
from multiprocessing.connection import Connection, wait
from typing import NamedTuple

__all__ = ["VerifierPool", "VerifyResult", "verify_batch"]

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 120.0  # importing sympy on a loaded machine can take a while
MAX_STARTUP_FAILURES = 3
CODE_TEST_OVERHEAD_S = 1.5  # interpreter start and sandbox set-up, per test
PIPELINE_DEPTH = 2
PIPELINE_MAX_BYTES = 32 * 1024  # half the usual 64 KiB pipe buffer


class VerifyResult(NamedTuple):
    """Scores in [0, 1] in item order, and failure counts by kind (see the module docstring)."""

    scores: list[float]
    failures: dict[str, int]


class _Worker:
    def __init__(self, memory_mb: int):
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fastprime.trainer.verifiers.worker", str(to_child_r), str(from_child_w)]
            + [str(memory_mb)],
            pass_fds=(to_child_r, from_child_w),
            stdin=subprocess.DEVNULL,
            close_fds=True,
        )
        os.close(to_child_r)
        os.close(from_child_w)
        self.send_conn = Connection(to_child_w, readable=False)
        self.recv_conn = Connection(from_child_r, writable=False)
        self.ready = False
        self.started = time.monotonic()
        self.queue: collections.deque[tuple[int, str, float]] = collections.deque()  # (index, ability, limit)
        self.deadline = 0.0  # for the task at the head of the queue, the one the worker is running

    def kill(self) -> None:
        from fastprime.trainer.verifiers.code_sandbox import cleanup_sandboxes_of

        with contextlib.suppress(OSError):
            self.proc.kill()
        self.proc.wait()
        cleanup_sandboxes_of(self.proc.pid)
        for c in (self.send_conn, self.recv_conn):
            with contextlib.suppress(OSError):
                c.close()


def _check_item(item) -> str | None:
    """The item's ability if it is well formed, else None."""
    if not isinstance(item, dict):
        return None
    ability, response, gt = item.get("ability"), item.get("response"), item.get("ground_truth")
    if ability not in ("math", "code") or not isinstance(response, str):
        return None
    if ability == "math" and not isinstance(gt, str):
        return None
    if ability == "code" and not isinstance(gt, (str, dict)):
        return None
    return ability


class VerifierPool:
    """A long-lived pool of verifier processes; `score(items)` grades a batch in parallel.

    Args:
        workers: number of worker processes (default: usable CPUs, at most 8).
        timeout_s: hard limit per math answer, in seconds. A code answer gets
            `timeout_s + n_tests * (code_test_timeout_s + 1.5)`, its sandbox enforcing the per-test limit.
        code_test_timeout_s: wall-clock limit per code test (PRIME's reference uses 5 s).
        memory_mb: address-space limit of each worker (a runaway big-integer computation fails cleanly).
    """

    def __init__(
        self,
        *,
        workers: int | None = None,
        timeout_s: float = 10.0,
        code_test_timeout_s: float = 5.0,
        memory_mb: int = 4096,
    ):
        if workers is None:
            workers = max(1, min(len(os.sched_getaffinity(0)), 8))
        if not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be a positive int, got {workers!r}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        if not code_test_timeout_s > 0:
            raise ValueError(f"code_test_timeout_s must be > 0, got {code_test_timeout_s!r}")
        self.timeout_s = float(timeout_s)
        self.code_test_timeout_s = float(code_test_timeout_s)
        self.memory_mb = int(memory_mb)
        self._workers = [_Worker(self.memory_mb) for _ in range(workers)]
        self._closed = False

    def _time_limit(self, ability: str, ground_truth) -> float:
        if ability == "math":
            return self.timeout_s
        from fastprime.trainer.verifiers.code_sandbox import MAX_SCORED_TESTS, parse_code_tests

        n = min(len(parse_code_tests(ground_truth).cases), MAX_SCORED_TESTS)
        return self.timeout_s + n * (self.code_test_timeout_s + CODE_TEST_OVERHEAD_S)

    def _replace(self, i: int) -> None:
        self._workers[i].kill()
        self._workers[i] = _Worker(self.memory_mb)

    def _tasks(self, items: list, failures: collections.Counter) -> collections.deque[tuple[int, str, float]]:
        """(index, ability, time limit) of every well-formed item, longest limit first; counts the malformed."""
        todo = []
        for idx, item in enumerate(items):
            ability = _check_item(item)
            if ability is None:
                failures["malformed"] += 1
                continue
            try:
                limit = self._time_limit(ability, item["ground_truth"])
            except ValueError as e:
                log.info("verifier: malformed %s item %d: %s", ability, idx, e)
                failures["malformed"] += 1
                continue
            todo.append((idx, ability, limit))
        # Longest first: code items bound the batch's wall time.
        return collections.deque(sorted(todo, key=lambda t: -t[2]))

    def _dispatch(self, w, todo: collections.deque, items: list, now: float) -> None:
        """Send worker `w` tasks from the front of `todo` until it has PIPELINE_DEPTH in flight."""
        # Two tasks in flight per worker: it starts the next one without waiting for the score loop.
        while w.ready and len(w.queue) < PIPELINE_DEPTH and todo:
            task = todo.popleft()
            item = items[task[0]]
            msg = ("task", task[0], task[1], item["response"], item["ground_truth"], self.code_test_timeout_s)
            data = pickle.dumps(msg)
            if w.queue and len(data) > PIPELINE_MAX_BYTES:
                # A queued message waits in the pipe while the worker is busy; more than the pipe
                # holds would block the score loop (and with it every time limit). Send it when idle.
                todo.appendleft(task)
                return
            try:
                w.send_conn.send_bytes(data)
            except (OSError, ValueError):
                todo.appendleft(task)
                return
            w.queue.append(task)
            if len(w.queue) == 1:
                w.deadline = now + task[2]

    def score(self, items) -> VerifyResult:
        """Score `items` (dicts with "ability", "response", "ground_truth"); never raises for bad items.

        Returns a VerifyResult with one score per item, in order. Blocks until every item is scored, which is
        bounded by the time limits (a worker that does not start within 120 s is replaced, and after 3
        failed starts in a row the remaining items are scored 0 as "crash").
        """
        if self._closed:
            raise RuntimeError("VerifierPool is closed")
        items = list(items)
        scores = [0.0] * len(items)
        failures: collections.Counter[str] = collections.Counter()
        todo = self._tasks(items, failures)
        startup_failures = 0
        while todo or any(w.queue for w in self._workers):
            now = time.monotonic()
            for w in self._workers:
                self._dispatch(w, todo, items, now)
            deadlines = [w.deadline for w in self._workers if w.queue]
            deadlines += [w.started + STARTUP_TIMEOUT_S for w in self._workers if not w.ready]
            wait_s = max(0.0, min(deadlines) - now) if deadlines else 0.05
            ready = wait([w.recv_conn for w in self._workers], timeout=min(wait_s, 1.0))
            for i, w in enumerate(list(self._workers)):
                if w.recv_conn not in ready:
                    continue
                try:
                    msg = w.recv_conn.recv()
                except (EOFError, OSError):
                    if w.queue:
                        failures["crash"] += 1
                        log.warning("verifier: worker %d died on item %d", w.proc.pid, w.queue[0][0])
                        w.queue.popleft()
                    elif not w.ready:
                        startup_failures += 1
                    todo.extendleft(reversed(w.queue))  # queued behind the lost item: not started yet
                    self._replace(i)
                    continue
                if msg[0] == "ready":
                    w.ready = True
                    startup_failures = 0
                elif msg[0] == "result" and w.queue and msg[1] == w.queue[0][0]:
                    scores[msg[1]] = min(1.0, max(0.0, msg[2]))
                    if msg[3]:
                        failures[msg[3]] += 1
                    w.queue.popleft()
                    if w.queue:
                        w.deadline = time.monotonic() + w.queue[0][2]
            now = time.monotonic()
            for i, w in enumerate(list(self._workers)):
                if w.queue and now > w.deadline:
                    failures["timeout"] += 1
                    log.info("verifier: item %d timed out; replacing worker %d", w.queue[0][0], w.proc.pid)
                    w.queue.popleft()
                    todo.extendleft(reversed(w.queue))
                    self._replace(i)
                elif not w.ready and now > w.started + STARTUP_TIMEOUT_S:
                    startup_failures += 1
                    self._replace(i)
            if startup_failures >= MAX_STARTUP_FAILURES * len(self._workers) and todo:
                log.error("verifier: workers fail to start; scoring %d items 0 as crash", len(todo))
                failures["crash"] += len(todo)
                todo.clear()
        return VerifyResult(scores, dict(failures))

    def close(self) -> None:
        """Stop every worker (and anything its sandboxes left running)."""
        if self._closed:
            return
        self._closed = True
        for w in self._workers:
            w.kill()

    def __enter__(self) -> VerifierPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()


def verify_batch(items, *, timeout_s: float = 10.0, workers: int | None = None) -> list[float]:
    """Score `items` with a temporary VerifierPool; returns one score in [0, 1] per item, in order.

    Each item is {"ability": "math"|"code", "response": str, "ground_truth": str | dict}. For repeated
    batches keep a VerifierPool instead: starting workers costs about a second each.
    """
    items = list(items)
    if not items:
        return []
    if workers is None:
        workers = max(1, min(len(os.sched_getaffinity(0)), 8, len(items)))
    with VerifierPool(workers=workers, timeout_s=timeout_s) as pool:
        return pool.score(items).scores

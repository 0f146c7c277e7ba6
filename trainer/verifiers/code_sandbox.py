"""Code verifier: run the response's last ```python block against the problem's tests in a sandbox.

Each test is one run of `sandbox_child.py` under the system interpreter (`python -I -S`, no site-packages):
a new session (killed as a whole group at the time limit), network and mount namespaces (no network; the
project, /tmp and home directories hidden), CPU/memory/file-size/process/open-file limits, and an
unprivileged uid. The uid is `SANDBOX_UID_BASE + pid of the verifier process`: unique among live verifier
processes (so RLIMIT_NPROC counts only this verifier's own sandbox, and two pools on one node never share
a uid), with no passwd entry and no files anywhere. That makes cleanup exact: after every run, a forked
helper switches to that uid and sends SIGKILL to every process the uid owns (`kill(-1)`), which also reaps
children that escaped the process group with setsid(). Without root the uid switch, namespaces and
RLIMIT_NPROC are skipped (logged once) and only the group kill applies.

Tests (PRIME/APPS style): `{"inputs": [...], "outputs": [...], "fn_name": optional}`, or
`{"fn_name": ..., "assert_case": ["assert f(1) == 2", ...]}`. stdin/stdout tests compare like the PRIME
reference after its whitespace handling (each line stripped, surrounding blank lines ignored; numeric tokens
compared with numpy.allclose's default tolerance) but never as unordered token sets. Function tests compare
the returned plain value with the expected one (tuples as lists, and APPS's one-element output wrapping).
Reward (PRIME): 1 if every test passes, else the fraction of the first 10 tests passed. Because a failure
after the 10th test still leaves 10/10, only the first 10 tests are run.
"""

from __future__ import annotations

import ast
import atexit
import contextlib
import json
import logging
import math
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import NamedTuple

__all__ = ["SandboxLimits", "CodeTests", "extract_code", "parse_code_tests", "run_code_tests", "score_code"]

log = logging.getLogger(__name__)

SANDBOX_UID_BASE = 1_000_000_000
MAX_SCORED_TESTS = 10
_CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_child.py")
_FENCE_RE = re.compile(r"```[ \t]*(python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
_warned_unprivileged = False
CPU_CGROUP_ROOT = "/sys/fs/cgroup/cpu/fastprime-sandbox"
_cpu_group: str | None = None  # this process's sandbox cpu group once created ("" = unavailable)


@dataclass(frozen=True)
class SandboxLimits:
    """Per-test limits of one sandboxed run."""

    test_timeout_s: float = 5.0  # wall clock per test; the process group is killed after it
    memory_mb: int = 1024  # RLIMIT_AS
    file_size_mb: int = 16  # RLIMIT_FSIZE: also caps captured stdout; tmpfs holds at most twice this
    max_procs: int = 8  # RLIMIT_NPROC for the sandbox uid: a fork bomb's spinning children are capped here
    python: str = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else "python3"


class CodeTests(NamedTuple):
    """Parsed tests: `kind` is "stdio", "call" or "assert"; `cases` are (input, expected) pairs."""

    kind: str
    fn_name: str | None
    cases: list


class TestRun(NamedTuple):
    passed: bool
    status: str  # "pass", "wrong", "error", "timeout", "no_result", "sandbox_error"


def extract_code(response: str) -> str | None:
    """The last ```python (or ```py, or bare ```) block of `response`; the whole text if it has no fence."""
    if not isinstance(response, str) or not response.strip():
        return None
    blocks = _FENCE_RE.findall(response)
    if blocks:
        py = [code for lang, code in blocks if lang]
        code = (py or [code for _, code in blocks])[-1]
        return code if code.strip() else None
    return None if "```" in response else response


def parse_code_tests(ground_truth: str | dict) -> CodeTests:
    """Validate a PRIME/APPS test spec (dict or its JSON string); ValueError names what is wrong."""
    spec = ground_truth
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as e:
            raise ValueError(f"code ground_truth is not valid JSON: {e}") from None
    if not isinstance(spec, dict):
        raise ValueError(f"code ground_truth must be a dict, got {type(spec).__name__}")
    fn_name = spec.get("fn_name")
    if fn_name is not None and (not isinstance(fn_name, str) or not fn_name.isidentifier()):
        raise ValueError(f"fn_name must be an identifier, got {fn_name!r}")
    asserts = spec.get("assert_case")
    if asserts:
        if not isinstance(asserts, list) or not all(isinstance(a, str) for a in asserts):
            raise ValueError("assert_case must be a list of strings")
        return CodeTests("assert", fn_name, [(a, None) for a in asserts])
    inputs, outputs = spec.get("inputs"), spec.get("outputs")
    if not isinstance(inputs, list) or not isinstance(outputs, list) or len(inputs) != len(outputs):
        raise ValueError(
            f"tests need 'inputs' and 'outputs' lists of equal length, got {type(inputs).__name__} "
            f"and {type(outputs).__name__}"
        )
    if not inputs:
        raise ValueError("tests are empty")
    if any(o is None for o in outputs):
        raise ValueError("a test has no expected output (None)")
    return CodeTests("call" if fn_name else "stdio", fn_name, list(zip(inputs, outputs)))


def _call_args(inp) -> list:
    # APPS gives a list of arguments; PRIME/LeetCode gives one JSON value per line.
    if isinstance(inp, list):
        return inp
    if isinstance(inp, str):
        return [_literal(line) for line in inp.split("\n") if line.strip()]
    return [inp]


def _literal(text: str):
    """A JSON value, or a Python literal (True, None, tuples) as some data sets write them; dataset text only."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return json.loads(json.dumps(ast.literal_eval(text.strip())))


def _plain_expected(out):
    if isinstance(out, str):
        try:
            return _literal(out)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            return out
    return json.loads(json.dumps(out))  # tuples -> lists, as the child reports them


def _floats_close(a: str, b: str) -> bool:
    try:
        x, y = float(a), float(b)
    except ValueError:
        return False
    if not (math.isfinite(x) and math.isfinite(y)):
        return False
    return abs(x - y) <= 1e-8 + 1e-5 * abs(y)  # numpy.allclose defaults, as the PRIME reference uses


def stdout_matches(output: str, expected) -> bool:
    """PRIME-reference stdout comparison minus its order-insensitive token-set fallback."""
    if isinstance(expected, list):
        expected = "\n".join(str(e) for e in expected)
    if not isinstance(expected, str):
        return False
    got = [line.strip() for line in output.strip().splitlines()]
    want = [line.strip() for line in expected.strip().splitlines()]
    if got == want:
        return True
    if len(got) != len(want):
        return False
    for g, w in zip(got, want):
        gt, wt = g.split(), w.split()
        if len(gt) != len(wt) or not all(a == b or _floats_close(a, b) for a, b in zip(gt, wt)):
            return False
    return True


def _value_matches(value, expected) -> bool:
    if value == expected:
        return True
    return isinstance(expected, list) and len(expected) == 1 and value == expected[0]


def _wait_exit(proc: subprocess.Popen, timeout_s: float) -> bool:
    """Wait for `proc` to exit, at most `timeout_s`; True if it did. A pidfd wakes up at the exit itself
    (Popen.wait(timeout) polls with sleeps of up to 50 ms, a third of a short test's cost)."""
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        try:
            proc.wait(timeout=timeout_s)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        return bool(select.select([fd], [], [], timeout_s)[0])
    finally:
        os.close(fd)


def _kill_uid(uid: int) -> None:
    """SIGKILL every process owned by `uid` (a forked helper drops to it and calls kill(-1))."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.setgid(uid)
            os.setuid(uid)
            # Repeat: a fork bomb can create children while one kill(-1) pass walks the process list.
            for _ in range(10):
                os.kill(-1, signal.SIGKILL)
        except BaseException:
            pass  # ProcessLookupError: nothing (left) to kill
        os._exit(0)
    os.waitpid(pid, 0)


def sandbox_uid() -> int | None:
    """The uid this process's sandboxes run as, or None when not root (no uid switch possible)."""
    global _warned_unprivileged
    if os.geteuid() != 0:
        if not _warned_unprivileged:
            log.warning("code sandbox: not root, so no uid switch, namespaces or RLIMIT_NPROC")
            _warned_unprivileged = True
        return None
    return SANDBOX_UID_BASE + os.getpid()


def _cpu_group_path(worker_pid: int) -> str:
    return os.path.join(CPU_CGROUP_ROOT, str(worker_pid))


def sandbox_cpu_group() -> str | None:
    """The cgroup (v1 cpu controller) that this verifier process's sandboxes run in, created on first use;
    None where there is no writable cpu hierarchy (or not root).

    One group per verifier process: the scheduler then shares the CPU between concurrent sandboxes group by
    group, so a program whose children each start a new session (escaping autogroup's per-session sharing)
    still gets one sandbox's share and cannot starve an honest program in the next worker past its limit."""
    global _cpu_group
    if _cpu_group is None:
        _cpu_group = ""
        path = _cpu_group_path(os.getpid())
        if os.geteuid() == 0 and os.path.exists(os.path.join(os.path.dirname(CPU_CGROUP_ROOT), "cpu.shares")):
            try:
                os.makedirs(path, exist_ok=True)
                _cpu_group = path
                # A pool's killed workers are cleaned up by the pool; a process that ends normally, here
                # (not a forked child, which inherits this hook but not the group).
                creator = os.getpid()
                atexit.register(lambda: os.getpid() == creator and cleanup_sandboxes_of(creator))
            except OSError as e:
                log.warning("code sandbox: no cpu cgroup for sandboxes (%s): CPU shared per process", e)
    return _cpu_group or None


def cleanup_sandboxes_of(worker_pid: int) -> None:
    """Kill whatever the sandboxes of the (dead) verifier process `worker_pid` left running, and remove their
    cpu cgroup."""
    if os.geteuid() != 0:
        return
    _kill_uid(SANDBOX_UID_BASE + worker_pid)
    group = _cpu_group_path(worker_pid)
    for _ in range(50):  # rmdir fails while the killed processes are still leaving the group
        try:
            os.rmdir(group)
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.02)
    log.warning("code sandbox: could not remove cpu cgroup %s", group)


def _judge_run(
    tests: CodeTests, index: int, files: dict[str, str], nonce: str, returncode: int, limits: SandboxLimits
) -> TestRun:
    """The verdict on a finished (not timed-out) run of test `index` from its stdout or result file."""
    inp, expected = tests.cases[index]
    if tests.kind == "stdio":
        with open(files["stdout"], "rb") as f:
            out = f.read(limits.file_size_mb * 1024 * 1024).decode("utf-8", errors="replace")
        ok = stdout_matches(out, expected)
        return TestRun(ok, "pass" if ok else ("wrong" if returncode == 0 else "error"))
    with open(files["result"], "rb") as f:
        lines = f.read(limits.file_size_mb * 1024 * 1024).decode("utf-8", errors="replace").splitlines()
    msgs = [json.loads(line[len(nonce) :]) for line in lines if line.startswith(nonce)]
    if len(msgs) != 1 or not isinstance(msgs[0], dict):
        return TestRun(False, "no_result")
    msg = msgs[0]
    if not msg.get("ok"):
        return TestRun(False, "error")
    ok = _judge_value(msg.get("value"), tests, inp, expected)
    return TestRun(ok, "pass" if ok else "wrong")


def run_one_test(code: str, tests: CodeTests, index: int, *, limits: SandboxLimits) -> TestRun:
    """Run test `index` of `tests` against `code` in a fresh sandbox; the parent decides pass/fail."""
    inp, expected = tests.cases[index]
    uid = sandbox_uid()
    nonce = secrets.token_hex(16)
    private = tempfile.mkdtemp(prefix="fastprime-sbx-")  # mode 0700: the sandbox uid cannot open it
    workdir = os.path.join(private, "box")
    os.mkdir(workdir, 0o700)
    if uid is not None:
        os.chown(workdir, uid, uid)
        os.chmod(private, 0o711)  # only for the fallback without a mount namespace
    job = {
        "nonce": nonce,
        "mode": tests.kind,
        "code": code,
        "fn_name": tests.fn_name,
        "timeout_s": limits.test_timeout_s,
        "memory_mb": limits.memory_mb,
        "fsize_mb": limits.file_size_mb,
        "max_procs": limits.max_procs,
        "uid": uid,
        "cpu_group": sandbox_cpu_group() if uid is not None else None,
        "workdir": workdir,
        "result_fd": -1,
    }
    stdin_text = ""
    if tests.kind == "stdio":
        stdin_text = "" if inp is None else ("\n".join(map(str, inp)) if isinstance(inp, list) else str(inp))
    elif tests.kind == "call":
        try:
            job["args"] = _call_args(inp)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            shutil.rmtree(private, ignore_errors=True)
            return TestRun(False, "error")
    else:
        job["test"] = inp
    files = {}
    try:
        for name in ("cfg", "stdin", "stdout", "result"):
            files[name] = os.path.join(private, name)
        with open(files["stdin"], "w") as f:
            f.write(stdin_text)
        res_w = os.open(files["result"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        job["result_fd"] = res_w
        with open(files["cfg"], "w") as f:
            json.dump(job, f)
        cfg_r = os.open(files["cfg"], os.O_RDONLY)
        with open(files["stdin"], "rb") as fin, open(files["stdout"], "wb") as fout:
            proc = subprocess.Popen(
                [limits.python, "-I", "-S", _CHILD, str(cfg_r)],
                stdin=fin,
                stdout=fout,
                stderr=subprocess.DEVNULL,
                pass_fds=(cfg_r, res_w),
                start_new_session=True,
                cwd="/",
                close_fds=True,
            )
        os.close(cfg_r)
        os.close(res_w)
        timed_out = not _wait_exit(proc, limits.test_timeout_s + 0.5)  # + interpreter start-up
        # Sandbox uid first: that kills the program (its PID namespace's init, which takes the namespace
        # down) while the root launcher is alive to reap it, so no zombie is left holding an NPROC slot.
        if uid is not None:
            _kill_uid(uid)
            _wait_exit(proc, 1.0)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if timed_out:
            return TestRun(False, "timeout")
        return _judge_run(tests, index, files, nonce, proc.returncode, limits)
    except (OSError, ValueError) as e:
        log.warning("code sandbox: could not run a test: %s", e)
        return TestRun(False, "sandbox_error")
    finally:
        shutil.rmtree(private, ignore_errors=True)


def _judge_value(value, tests: CodeTests, inp, expected) -> bool:
    if tests.kind == "call":
        return _value_matches(value, _plain_expected(expected))
    # assert mode: the child sent the left side of `assert left == right` (or the whole expression).
    stmt = ast.parse(inp.strip(), mode="exec").body[0]
    expr = stmt.test if isinstance(stmt, ast.Assert) else stmt.value
    if isinstance(expr, ast.Compare) and len(expr.ops) == 1 and isinstance(expr.ops[0], ast.Eq):
        try:
            want = ast.literal_eval(expr.comparators[0])
        except (ValueError, SyntaxError, TypeError):
            return False  # only literal right-hand sides are judged; anything else could be forged
        return value == json.loads(json.dumps(want))
    return value is True


def run_code_tests(code: str, tests: CodeTests, *, limits: SandboxLimits = SandboxLimits()) -> list[TestRun]:
    """Run the first `MAX_SCORED_TESTS` tests, one sandbox each, in order."""
    return [
        run_one_test(code, tests, i, limits=limits) for i in range(min(len(tests.cases), MAX_SCORED_TESTS))
    ]


def score_code(
    response: str, ground_truth: str | dict, *, limits: SandboxLimits = SandboxLimits()
) -> tuple[float, str | None]:
    """Score one code response: (reward in [0, 1], failure kind or None).

    Failure kinds: "malformed" (bad test spec), "no_answer" (no code block), "error" (the sandbox could
    not run a test at all, e.g. its interpreter is missing; logged).
    """
    try:
        tests = parse_code_tests(ground_truth)
    except ValueError as e:
        log.info("code verifier: malformed tests: %s", e)
        return 0.0, "malformed"
    code = extract_code(response)
    if code is None:
        return 0.0, "no_answer"
    t0 = time.perf_counter()
    runs = run_code_tests(code, tests, limits=limits)
    log.debug("code verifier: %d tests in %.2fs", len(runs), time.perf_counter() - t0)
    # The sandbox itself failing (no interpreter, no disk) is the verifier's failure, not the program's.
    failure = "error" if any(r.status == "sandbox_error" for r in runs) else None
    return sum(r.passed for r in runs) / len(runs), failure

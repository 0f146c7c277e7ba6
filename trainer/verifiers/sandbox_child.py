"""The sandboxed child of `code_sandbox`: a standalone script, run as `python -I -S sandbox_child.py`.

It starts as root (when the verifier runs as root), locks itself in, then runs the untrusted program in this
same interpreter:
1. reads its job (JSON) from the inherited fd given in argv[1] and closes it, and joins its verifier's cpu
   cgroup when there is one (so all it starts shares one CPU share with the verifier's other sandboxes);
2. isolation, each step best effort and reported on stderr if unavailable: a new network namespace (no
   network at all), a new mount namespace where every top-level directory except the system's own (/usr,
   /etc, /proc, ...) is replaced by an empty tmpfs and every top-level file by /dev/null, so the project,
   the data and other jobs' files are invisible wherever they live (an allowlist: a checkout under /check
   or /data is hidden as well as one under /work); the interpreter's stdlib is bound back if it lived in a
   hidden tree;
   and a new PID namespace (the program runs as its PID 1 in a forked child; everything it starts dies
   with it);
3. a fresh working directory on that tmpfs (or the parent-made one when namespaces are unavailable);
4. resource limits: CPU seconds, address space, file size, process count, open files, no core dumps,
   and a lower scheduling priority (nice 10);
5. drops to an unprivileged uid/gid with no supplementary groups (RLIMIT_NPROC binds only non-root);
6. runs the program: "stdio" mode executes it as __main__ (stdin/stdout are the test's files), "call"
   mode calls one function and "assert" mode evaluates one test expression; for those two the result is
   reduced to plain JSON data (exact builtin types only, so an object whose __eq__ always returns True
   cannot be reported) and written to the result fd, prefixed with a per-run nonce. The parent alone holds
   the expected outputs and decides pass/fail; exit status is never trusted. An assert test sees the builtins,
   the modules and (with a fn_name) the prelude's other names as they were before the program ran, so
   patching `math.isclose` or defining `isclose` does not change what the test calls.
   In-process checks are best effort: a program that digs the saved copies out of `gc` could still reach them.
Must only use the standard library: it runs under the system interpreter, outside the project's venv.
"""

import ast
import builtins
import ctypes
import json
import os
import resource
import sys
import types

CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
CLONE_NEWPID = 0x20000000
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_NOSUID = 2
MS_NODEV = 4
MS_BIND = 4096
MS_RDONLY = 1
MS_REMOUNT = 32
O_PATH = 0o10000000
# Top-level entries the program may see: the system's programs, libraries and config. Everything else at the
# top level (homes, /tmp, /var, /opt, /mnt, checkouts, data) is hidden; /dev/shm too.
SYSTEM_DIRS = frozenset(
    {"usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc", "proc", "sys", "dev"}
)
PRELUDE = (
    "import sys, math, itertools, collections, heapq, bisect, functools, string, re, random\n"
    "from typing import *\n"
    "from collections import *\n"
    "from itertools import *\n"
    "from functools import *\n"
    "from heapq import *\n"
    "from bisect import *\n"
    "from math import *\n"
)


def _isolate(job, libc):
    notes = []
    mounted = False
    if libc.unshare(CLONE_NEWNET) != 0:
        notes.append("no network namespace")
    if libc.unshare(CLONE_NEWNS) == 0 and libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) == 0:
        mounted = True
        opts = b"size=%dm,mode=0755" % max(1, job["fsize_mb"] * 2)
        # Hiding a tree that holds the stdlib would break imports: keep O_PATH handles to bind them back.
        stdlib = {
            p: os.open(p, O_PATH)
            for p in sys.path
            if p.startswith(sys.base_prefix + "/") and os.path.isdir(p) and not _visible(p)
        }
        hidden = ["/dev/shm"] + ["/" + n for n in sorted(os.listdir("/")) if n not in SYSTEM_DIRS]
        for d in hidden:
            if os.path.islink(d):
                continue  # mounting on a link would cover its target, e.g. /lib -> usr/lib
            if os.path.isdir(d):
                rc = libc.mount(b"tmpfs", d.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, opts)
            elif os.path.exists(d):
                rc = libc.mount(b"/dev/null", d.encode(), None, MS_BIND, None)
            else:
                continue
            if rc != 0:
                notes.append("could not hide " + d)
        for p, fd in stdlib.items():
            os.makedirs(p, exist_ok=True)
            if (
                libc.mount(b"/proc/self/fd/%d" % fd, p.encode(), None, MS_BIND | MS_REC, None) != 0
                or libc.mount(None, p.encode(), None, MS_REMOUNT | MS_BIND | MS_RDONLY, None) != 0
            ):
                notes.append("could not keep " + p)
            os.close(fd)
    else:
        notes.append("no mount namespace")
    if libc.unshare(CLONE_NEWPID) == 0:
        # The next child is PID 1 of a new PID namespace: when it ends, the kernel kills and reaps every
        # process the program started. Otherwise orphans are reparented to the host's init and, until it
        # reaps them, their zombies count against the sandbox uid's RLIMIT_NPROC in the next test.
        pid = os.fork()
        if pid:
            os.closerange(0, 3)
            _, status = os.waitpid(pid, 0)
            os._exit(os.waitstatus_to_exitcode(status) & 0xFF)
    else:
        notes.append("no PID namespace")
    return mounted, notes


def _visible(path):
    top = os.path.realpath(path).split("/")[1]
    return top in SYSTEM_DIRS


def _limits(job):
    cpu = int(job["timeout_s"]) + 1
    mem = job["memory_mb"] * 1024 * 1024
    fsize = job["fsize_mb"] * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    if job["uid"] is not None:
        resource.setrlimit(resource.RLIMIT_NPROC, (job["max_procs"], job["max_procs"]))


def _plain(x, depth=0, _type=type, _len=len):
    # Exact types only: a subclass (or any object) could lie in __eq__, __str__ or __iter__.
    t = _type(x)
    if depth > 50:
        raise TypeError("result nested too deeply")
    if x is None or t in (bool, int, str):
        return x
    if t is float:
        return x if x == x and x not in (float("inf"), float("-inf")) else repr(x)
    if t in (list, tuple):
        return [_plain(v, depth + 1) for v in x]
    if t is dict:
        return {
            str(k) if _type(k) in (int, str, bool) else repr(k): _plain(v, depth + 1) for k, v in x.items()
        }
    raise TypeError("unsupported result type " + t.__name__)


_PLAIN_TYPES = (type(None), bool, int, float, complex, str, bytes, list, tuple, dict, set, frozenset)


def _check_plain(x, depth=0, _type=type):
    """Return `x` unchanged if it is built only from exact builtin types, else raise TypeError."""
    t = _type(x)
    if t not in _PLAIN_TYPES or depth > 50:
        raise TypeError("call returned a non-plain " + t.__name__)
    if t in (list, tuple, set, frozenset):
        for v in x:
            _check_plain(v, depth + 1)
    elif t is dict:
        for k, v in x.items():
            _check_plain(k, depth + 1)
            _check_plain(v, depth + 1)
    return x


def _module_snapshots():
    """{id: (module, a copy of its attributes)} for every loaded module, taken before the program runs."""
    return {
        id(m): (m, types.SimpleNamespace(**vars(m)))
        for m in list(sys.modules.values())
        if type(m) is types.ModuleType
    }


def _as_before(value, snapshots):
    """What a test sees for a name: a module as it was before the program ran (so `math.isclose = ...` or
    rebinding `math` cannot change what `assert math.isclose(f(x), y)` calls), anything else as it is."""
    entry = snapshots.get(id(value))
    return entry[1] if entry is not None and entry[0] is value else value


class _WrapCalls(ast.NodeTransformer):
    def visit_Call(self, node):
        self.generic_visit(node)
        return ast.Call(func=ast.Name("__fp_check__", ast.Load()), args=[node], keywords=[])


def _enter_sandbox(job: dict) -> str:
    """Join the CPU group, isolate, write the program, set limits and drop to the sandbox uid; its path."""
    workdir = job["workdir"]
    if job.get("cpu_group"):
        try:  # first, so that everything the program starts shares this worker's one CPU share
            with open(os.path.join(job["cpu_group"], "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
        except OSError:
            sys.stderr.write("sandbox: could not join cpu cgroup\n")
    if job["uid"] is not None:
        libc = ctypes.CDLL(None, use_errno=True)
        mounted, notes = _isolate(job, libc)
        if mounted:
            workdir = "/tmp/box"
            os.makedirs(workdir, mode=0o700)
            os.chown(workdir, job["uid"], job["uid"])
        for n in notes:
            sys.stderr.write("sandbox: " + n + "\n")
    path = os.path.join(workdir, "solution.py")
    with open(path, "w") as f:
        f.write(job["code"])
    if job["uid"] is not None:
        os.chown(path, job["uid"], job["uid"])
    _limits(job)
    os.nice(10)  # a busy program yields the CPU to the trainer and the verifier itself
    if job["uid"] is not None:
        os.setgroups([])
        os.setgid(job["uid"])
        os.setuid(job["uid"])
    os.chdir(workdir)
    sys.argv = [path]
    sys.path.insert(0, workdir)
    return path


def main():
    cfg_fd = int(sys.argv[1])
    with os.fdopen(cfg_fd, "rb") as f:
        job = json.loads(f.read())
    nonce = job["nonce"]
    res_fd = job["result_fd"]
    dumps, write, exit_, getattr_ = json.dumps, os.write, os._exit, getattr
    safe_builtins = dict(vars(builtins))
    path = _enter_sandbox(job)

    def report(payload):
        write(res_fd, (nonce + dumps(payload) + "\n").encode())

    mode = job["mode"]
    ns = {
        "__name__": "__main__" if mode == "stdio" else "solution",
        "__file__": path,
        "__builtins__": builtins,
    }
    try:
        code = compile(job["code"], path, "exec")
    except BaseException as e:  # noqa: BLE001 - a syntax error is a failed test, reported like any other
        report({"ok": False, "error": "compile: " + _type_name(e)})
        exit_(0)
    if mode == "stdio":
        try:
            exec(code, ns)
        finally:
            sys.stdout.flush()
        return
    try:
        exec(PRELUDE, ns)
        modules_before = _module_snapshots()
        # What the prelude defined (math, isclose, Counter, ...) keeps that meaning in an assert test, except the
        # name under test: `isclose = lambda *a: True` or `math = Fake()` must not make `assert isclose(...)` pass.
        # Without a fn_name any name may be the one under test (a `gcd` to implement), so only modules are kept.
        fn_name = job.get("fn_name")
        prelude = {
            name: _as_before(v, modules_before)
            for name, v in ns.items()
            if not name.startswith("__") and name != fn_name and (fn_name or type(v) is types.ModuleType)
        }
        exec(code, ns)
        if mode == "call":
            fn_name = job["fn_name"]
            if "Solution" in ns and isinstance(ns["Solution"], type) and hasattr(ns["Solution"], fn_name):
                fn = getattr_(ns["Solution"](), fn_name)
            else:
                fn = ns[fn_name]
            value = fn(*job["args"])
        else:
            tree = ast.parse(job["test"].strip(), mode="exec").body[0]
            expr = tree.test if isinstance(tree, ast.Assert) else tree.value
            if isinstance(expr, ast.Compare) and len(expr.ops) == 1 and isinstance(expr.ops[0], ast.Eq):
                expr = expr.left  # the parent compares it with the right-hand side itself
            # Every call's result must be plain data before any operator touches it, and the test's own
            # builtins are the ones saved before the program ran (it may have replaced abs, sorted, ...).
            expr = ast.fix_missing_locations(_WrapCalls().visit(expr))
            test_globals = {name: _as_before(value, modules_before) for name, value in ns.items()}
            test_globals.update(
                prelude,
                __builtins__=safe_builtins,
                __fp_check__=_check_plain,
            )
            value = eval(compile(ast.Expression(expr), "<test>", "eval"), test_globals)
        out = _plain(value)
    except BaseException as e:  # noqa: BLE001 - SystemExit and KeyboardInterrupt included: all fail the test
        report({"ok": False, "error": _type_name(e)})
        exit_(0)
    report({"ok": True, "value": out})
    exit_(0)


def _type_name(e):
    return type(e).__name__


if __name__ == "__main__":
    main()

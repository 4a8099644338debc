"""The sandbox's supervisor: sets up one run's isolation, starts the program, reports its end.

Not imported by Kaizen: :class:`trainer.sandbox.Sandbox` runs this file by path as
``python -I -S sandbox_supervisor.py CONFIG`` (standard library only, no site) in the run's
directory, in a new session, with the run's environment. As the caller's user (root: still
privileged) it unshares the namespaces, builds the run's filesystem view (below), brings up the
private loopback, then forks the program: limits, no new privileges, the run uid, exec.

With a PID namespace it forks twice: the middle process is PID 1 there, mounts the namespace's
own /proc, pivots into the view, reaps, and its exit kills every process left in the
namespace. Without one it is a child subreaper and kills the rest by uid (``kill(-1)`` as that
uid) or process group. It reports JSON lines on ``report_fd``: ``{"error": ...}`` when setup or
exec fail, ``{"exit": wait status, "cpu": s, "maxrss_kib": n}`` at the end. SIGTERM from the
caller: kill everything now. Each process of a run dies with its parent (``PR_SET_PDEATHSIG``):
the wall clock lives in the caller, so a caller killed mid-run must not leave the run behind.

The filesystem view (``cfg["view"]``, with a mount namespace): a fresh tmpfs root holding only
what a Python program needs, read-only (``/usr`` and the ``/bin``/``/lib*`` links, a few files
of ``/etc``, the interpreter's prefix and venv), the run's directory read-write at its own
path, a fresh ``/proc`` (not for a judged test), a ``/dev`` of null/zero/full/random/urandom,
and private, size-capped tmpfs ``/tmp``, ``/run`` and ``/dev/shm``; then ``pivot_root`` and the
old root is detached.
Nothing else of the host is there: no ``/var`` (so no ``/var/run/postgresql`` socket, no lock
directory), no ``/root``, no ``/home``, no Kaizen data or code. Abstract-namespace Unix sockets
belong to the network namespace, which is private too.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import platform
import signal
import sys
import time

cfg = json.loads(sys.argv[1])
REPORT = cfg["report_fd"]
os.set_inheritable(REPORT, False)
state = {"role": "outer", "child": 0, "stopping": False}
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]

# linux/sched.h, linux/mount.h
CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND = 32, 1024, 2048, 4096
MS_REC, MS_PRIVATE, MS_RELATIME = 1 << 14, 1 << 18, 1 << 21
MNT_DETACH = 2
# statvfs flags a remount inside a user namespace must keep (the kernel locks them).
LOCKED_FLAGS = (
    (os.ST_NOSUID, MS_NOSUID),
    (os.ST_NODEV, MS_NODEV),
    (os.ST_NOEXEC, MS_NOEXEC),
    (os.ST_NOATIME, MS_NOATIME),
    (os.ST_NODIRATIME, MS_NODIRATIME),
    (os.ST_RELATIME, MS_RELATIME),
)
# pivot_root has no glibc wrapper; the syscall number depends on the architecture.
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}
DEVICES = ("null", "zero", "full", "random", "urandom")


def report(**msg: object) -> None:
    with contextlib.suppress(OSError):
        os.write(REPORT, (json.dumps(msg) + "\n").encode())


def check(ret: int, what: str) -> None:
    if ret != 0:
        e = ctypes.get_errno()
        raise OSError(e, what + ": " + os.strerror(e))


def _enc(s: str | None) -> bytes | None:
    return None if s is None else s.encode()


def mount(src: str | None, dst: str, fstype: str | None, flags: int, data: str | None = None):
    check(libc.mount(_enc(src), _enc(dst), _enc(fstype), flags, _enc(data)), "mount " + dst)


def kill_rest() -> None:
    if state["role"] == "outer" and state["child"]:
        with contextlib.suppress(OSError):
            os.kill(state["child"], signal.SIGKILL)
    elif state["role"] == "supervisor" and state["child"]:
        if cfg["kill"] == "uid":
            pid = os.fork()
            if pid == 0:
                try:
                    uid = cfg["uid"]
                    os.setgroups([])
                    os.setresgid(uid, uid, uid)
                    os.setresuid(uid, uid, uid)
                    for _ in range(3):
                        try:
                            os.kill(-1, signal.SIGKILL)
                        except ProcessLookupError:
                            break
                finally:
                    os._exit(0)
        else:
            for pid in [state["child"], *direct_children()]:
                with contextlib.suppress(OSError):
                    os.killpg(pid, signal.SIGKILL)
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)


def direct_children() -> list[int]:
    me, found = os.getpid(), []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open("/proc/" + name + "/stat", "rb") as f:
                    stat = f.read()
                if int(stat[stat.rindex(b")") + 2 :].split()[1]) == me:
                    found.append(int(name))
            except (OSError, ValueError):
                pass
    return found


def on_term(signum: int, frame: object) -> None:
    state["stopping"] = True
    kill_rest()


def detach_stdio() -> None:
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


# -- the filesystem view ----------------------------------------------------------------------


def _inside(root: str, path: str) -> str:
    return os.path.join(root, path.lstrip("/"))


def _make_parents(root: str, path: str) -> None:
    os.makedirs(os.path.dirname(_inside(root, path)), mode=0o755, exist_ok=True)


def bind(root: str, path: str, writable: bool, device: bool = False) -> None:
    """Show the host's ``path`` at the same place in the view; a symlink is copied as a link."""
    if os.path.islink(path):
        _make_parents(root, path)
        os.symlink(os.readlink(path), _inside(root, path))
        return
    if not os.path.exists(path):
        return
    target = _inside(root, path)
    _make_parents(root, path)
    if os.path.isdir(path):
        os.makedirs(target, mode=0o755, exist_ok=True)
    else:
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT, 0o644))
    mount(path, target, None, MS_BIND | MS_REC)
    if device:  # a device node: keep the host mount's flags (a nodev remount would break it)
        return
    flags = MS_BIND | MS_REMOUNT | MS_NOSUID | MS_NODEV
    if not writable:
        flags |= MS_RDONLY
    st = os.statvfs(path)
    for st_flag, ms_flag in LOCKED_FLAGS:
        if st.f_flag & st_flag:
            flags |= ms_flag
    mount(None, target, None, flags)


def tmpfs(root: str, path: str, mode: int, size: int) -> None:
    target = _inside(root, path)
    os.makedirs(target, mode=0o755, exist_ok=True)
    mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV, f"mode={mode:o},size={size}")


def build_view(view: dict) -> None:
    """Populate the view's root (run by the outer supervisor; /proc and the pivot come later,
    from PID 1 of the new PID namespace)."""
    root = view["root"]
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=4m")
    size = view["tmpfs_bytes"]
    # The private directories first, the runtime's paths on top: an interpreter or venv that
    # lives under /tmp or /run (a checkout in /tmp, as CI may make) must stay visible.
    tmpfs(root, "/tmp", 0o1777, size)
    tmpfs(root, "/run", 0o755, 1024 * 1024)
    tmpfs(root, "/dev", 0o755, 1024 * 1024)
    for name in DEVICES:
        bind(root, "/dev/" + name, writable=True, device=True)
    for name, target in (
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ):
        os.symlink(target, _inside(root, "/dev/" + name))
    tmpfs(root, "/dev/shm", 0o1777, size)
    for path in view["ro"]:
        bind(root, path, writable=False)
    for path in view["rw"]:  # the run's directory, under the private /tmp
        bind(root, path, writable=True)
    os.makedirs(_inside(root, "/proc"), mode=0o555, exist_ok=True)
    os.makedirs(_inside(root, "/.old-root"), mode=0o700, exist_ok=True)


def enter_view(view: dict) -> None:
    """In the new PID namespace: a /proc of its own (none for a judged test: /proc/self/mem
    would let the program read the harness's memory), then pivot into the view for good."""
    root = view["root"]
    if view["proc"]:
        mount("proc", _inside(root, "/proc"), "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    old = _inside(root, "/.old-root")
    number = SYS_PIVOT_ROOT.get(platform.machine())
    if number is None:
        raise OSError("pivot_root: unknown syscall number on " + platform.machine())
    check(libc.syscall(number, _enc(root), _enc(old)), "pivot_root")
    os.chdir("/")
    check(libc.umount2(b"/.old-root", MNT_DETACH), "umount old root")
    os.rmdir("/.old-root")
    # The root tmpfs itself read-only: the program can create files only where it is meant to.
    mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.chdir(view["cwd"])


def setup() -> None:
    flags = cfg["unshare"]
    if not flags:
        return
    uid, gid = os.getuid(), os.getgid()
    check(libc.unshare(flags), "unshare")
    if flags & CLONE_NEWUSER:  # map ourselves, nobody else
        for name, text in (
            ("setgroups", "deny"),
            ("uid_map", f"{uid} {uid} 1"),
            ("gid_map", f"{gid} {gid} 1"),
        ):
            with open("/proc/self/" + name, "w") as f:
                f.write(text)
    if flags & CLONE_NEWNS:
        mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing leaks out to the host
        if cfg["view"] is not None:
            build_view(cfg["view"])
    if flags & CLONE_NEWNET:  # bring up the private loopback (best effort)
        try:
            import fcntl
            import socket
            import struct

            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                req = struct.pack("16sh22x", b"lo", 0)
                up = struct.unpack("16sh22x", fcntl.ioctl(s, 0x8913, req))[1] | 1
                fcntl.ioctl(s, 0x8914, struct.pack("16sh22x", b"lo", up))
        except OSError:
            pass


# -- the program ------------------------------------------------------------------------------


def exec_program() -> None:
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
        import resource

        if cfg["kill"] == "pgrp":
            os.setpgid(0, 0)
        for which, soft, hard in cfg["rlimits"]:
            _, cur_hard = resource.getrlimit(which)
            if cur_hard != resource.RLIM_INFINITY:
                hard = min(hard, cur_hard)
            resource.setrlimit(which, (min(soft, hard), hard))
        check(libc.prctl(38, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
        for fd in cfg["pass_fds"]:  # the harness's input and seal pipes
            os.set_inheritable(fd, True)
        uid = cfg["uid"]
        if uid is not None:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
        # After the uid change (which clears it); it survives the exec.
        check(libc.prctl(1, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
        argv = cfg["argv"]
        os.execve(argv[0], argv, dict(os.environ))
    except BaseException as e:
        report(error=f"cannot start the program: {e}")
    os._exit(127)


def supervise(ns_init: bool) -> None:
    state["role"] = "supervisor"
    if ns_init:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if cfg["unshare"] & CLONE_NEWNS:
            try:
                if cfg["view"] is not None:
                    enter_view(cfg["view"])
                else:  # this namespace's processes only
                    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
            except OSError as e:
                report(error=f"sandbox setup: {e}")
                os._exit(125)
    else:
        libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphans come to us
    pid = os.fork()
    if pid == 0:
        exec_program()
    state["child"] = pid
    for fd in cfg["pass_fds"]:  # the program holds them now; EOF must follow its end
        os.close(fd)
    detach_stdio()
    if state["stopping"]:
        kill_rest()
    status, usage = None, None
    while True:
        try:
            got, st, ru = os.wait4(-1, 0)
        except ChildProcessError:
            break
        if got == pid:
            status, usage = st, ru
            break
    if not ns_init:  # as PID 1 our exit kills the rest
        kill_rest()
        give_up = time.monotonic() + 5
        while True:
            try:
                got, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if got == 0:
                if time.monotonic() > give_up:
                    break
                if cfg["kill"] == "pgrp":
                    kill_rest()
                time.sleep(0.005)
    if status is not None:
        report(exit=status, cpu=usage.ru_utime + usage.ru_stime, maxrss_kib=usage.ru_maxrss)
    os._exit(0)


def die_with_parent() -> None:
    """SIGKILL when our parent goes: a run must not outlive a caller that was killed before it
    could stop it (its wall clock lives in the caller). The flag survives the program's exec."""
    check(libc.prctl(1, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != cfg["parent"]:  # the parent went before the flag was set
        os._exit(125)


def main() -> None:
    die_with_parent()
    signal.signal(signal.SIGTERM, on_term)
    try:
        setup()
    except BaseException as e:
        report(error=f"sandbox setup: {e}")
        os._exit(125)
    if cfg["unshare"] & CLONE_NEWPID:  # our child is PID 1 in the new namespace
        cfg["parent"] = os.getpid()
        pid = os.fork()
        if pid == 0:
            check(libc.prctl(1, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
            supervise(ns_init=True)
        state["child"] = pid
        for fd in cfg["pass_fds"]:
            os.close(fd)
        detach_stdio()
        if state["stopping"]:
            kill_rest()
        while True:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                break
            except InterruptedError:
                continue
            break
        os._exit(0)
    supervise(ns_init=False)


main()

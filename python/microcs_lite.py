"""microcs in one file: call a local service by name, in pure Python (standard library only).

This is protocol v1 of microcs (docs/PROTOCOL.md) written in plain Python, for when the compiled
``microcs`` package cannot be installed: copy this file (and, for the original course project's
code, ``micro_server.py`` and ``micro_client.py``) next to your script. It speaks the same bytes
and follows the same rules as the Rust library, so a pure-Python client calls a Rust (or
``microcs serve``) service and the Rust client and the ``microcs`` command call a pure-Python
service. The exceptions have the names, bases and attributes of the compiled package's.

Serve::

    import microcs_lite as microcs

    def step(board: bytes) -> bytes:
        return board.upper()

    microcs.Server(step, "LIFE_GEN").start_listening()   # Ctrl-C stops it and frees the name

Call, from another process::

    with microcs.Client("LIFE_GEN", timeout=5.0) as client:
        print(client.request(b"give me some data back"))

Several processes behind one name: each serves it with ``Server(step, "LIFE_GEN", shared=True)``
(pure-Python and Rust instances may mix), and each new client connects to the instance with the
fewest connections.

What it does not have: ``AsyncClient``, NATS, the interrupt check of a waiting call (Ctrl-C
still interrupts it: the request is cancelled and the client stays usable). Python >= 3.9, Linux.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import inspect
import json
import logging
import os
import secrets
import select
import socket
import stat
import struct
import sys
import threading
import time
import types
import weakref
from typing import Any, Callable, Dict, Iterable, List, Mapping, NamedTuple, Optional, Tuple, Union

__version__ = "0.1.0"
__all__ = [
    "__version__",
    "Client",
    "Closed",
    "DEFAULT_TIMEOUT",
    "Error",
    "FrameTooLarge",
    "InvalidName",
    "InvalidConfig",
    "NameTaken",
    "NoService",
    "StartFailed",
    "PermissionDenied",
    "ProtocolError",
    "RemoteError",
    "Request",
    "Server",
    "ServiceInfo",
    "TimedOut",
    "list",
    "list_services",
    "runtime_dir",
]

#: Seconds a request may take by default, from the call to the reply.
DEFAULT_TIMEOUT = 30.0

# ---------------------------------------------------------------- protocol constants (§ 2-5, 9)

VERSION = 1
PREFIX_LEN = 4
HEADER_LEN = 20
FRAME_OVERHEAD = PREFIX_LEN + HEADER_LEN
MAX_METHOD_LEN = 64
DEFAULT_MAX_PAYLOAD = 16 * 1024 * 1024
#: The payload limit before the handshake has told a side the peer's (and a client's floor).
HANDSHAKE_PAYLOAD = 64 * 1024

HELLO, HELLO_ACK, REQUEST, REPLY, ERROR, CANCEL, PING, PONG, ITEM, CREDIT = range(1, 11)
KIND_NAMES = {
    1: "Hello", 2: "HelloAck", 3: "Request", 4: "Reply", 5: "Error", 6: "Cancel", 7: "Ping", 8: "Pong",
    9: "Item", 10: "Credit",
}

FLAG_NOT_RUN = 0x0001
FLAG_SYSTEM = 0x0002
#: A stream request (PROTOCOL.md § 17). This module neither sends nor serves streams: its server
#: announces no features, so clients never send it one.
FLAG_STREAM = 0x0004
FEATURE_STREAMS = 0x1

BAD_REQUEST, PERMISSION_DENIED, NO_METHOD, TIMED_OUT = 400, 403, 404, 408
TOO_LARGE, CANCELLED, HANDLER_FAILED, BUSY, VERSION_UNSUPPORTED = 413, 499, 500, 503, 505

#: Length prefix and header: length, version, kind, flags, id, status, method length, deadline.
_HEADER = struct.Struct(">IBBHQHHI")
_U32 = struct.Struct(">I")
_ACK = struct.Struct(">IIIH")
_TIMEVAL = struct.Struct("@ll")
_PEERCRED = struct.Struct("=iII")
#: Kernel send buffer asked for on each connection, as the Rust library does (PROTOCOL.md § 6).
SEND_BUFFER = 1024 * 1024
_READ_CHUNK = 64 * 1024
_log = logging.getLogger("microcs")

# ---------------------------------------------------------------- errors


class Error(Exception):
    """Base class of every microcs error; raised as itself for other I/O failures.

    ``may_have_run`` is True when the request may have reached the server and run before the
    failure; a request is never sent again by the library when it is.
    """

    may_have_run: bool

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        self.may_have_run = False


class InvalidName(Error, ValueError):
    """A service or method name is not valid (the message says what is allowed)."""


class InvalidConfig(Error, ValueError):
    """A setting does not make sense. Here for parity with the compiled package, which raises it
    for a bad ``transport`` or NATS URL; this module has no such settings."""


class NoService(Error, ConnectionError):
    """No service of that name is running."""


class StartFailed(NoService):
    """Starting the service from its definition failed (the compiled package starts services on
    demand; this module never does, so it never raises this: it is here so that both offer the
    same exceptions)."""


class NameTaken(Error):
    """Another live server owns the name (``owner_pid``, when known)."""

    owner_pid: Optional[int]

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        self.owner_pid = None


class TimedOut(Error, TimeoutError):
    """The request did not complete before its deadline."""


class RemoteError(Error):
    """The server answered with an error (``code``, ``message``); a handler may raise it."""

    code: int
    message: str

    def __init__(self, message: str = "", code: int = HANDLER_FAILED) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class FrameTooLarge(Error):
    """A payload is over the limit of whoever would receive it; nothing was sent."""


class ProtocolError(Error):
    """The peer broke the protocol or does not speak it (or a reply is not the text expected)."""


class PermissionDenied(Error, PermissionError):
    """Not allowed: another user's service, an unsafe runtime directory, a file in the way."""


class Closed(Error, ConnectionError):
    """The connection, client or server is closed."""


def _error(cls: type, message: str, may_have_run: bool = False) -> Error:
    e: Error = cls(message)
    e.may_have_run = may_have_run
    return e


def _from_remote(service: str, code: int, flags: int, message: str) -> Error:
    """The exception for an ``Error`` frame (as the Rust client's ``Error::from_remote``)."""
    cls: type = RemoteError
    if flags & FLAG_SYSTEM:
        cls = {
            TOO_LARGE: FrameTooLarge,
            PERMISSION_DENIED: PermissionDenied,
            TIMED_OUT: TimedOut,
            BAD_REQUEST: ProtocolError,
            VERSION_UNSUPPORTED: ProtocolError,
        }.get(code, RemoteError)
    if cls is RemoteError:
        text = f"service '{service}' answered with error {code}: {message}"
    elif cls is TimedOut:
        run = "did not run" if flags & FLAG_NOT_RUN else "may have run"
        text = f"service '{service}' did not answer in time ({message}); the request {run}"
    else:
        text = f"service '{service}' refused the request: {message}"
    e = _error(cls, text, not flags & FLAG_NOT_RUN)
    if isinstance(e, RemoteError):
        e.code, e.message = code, message
    return e


def _secs(t: float) -> str:
    """A duration as the Rust library writes it in messages (``30s``, ``250ms``)."""
    return f"{t:g}s" if t >= 1 else f"{t * 1000:g}ms"


# ---------------------------------------------------------------- names and the registry

MAX_NAME_LEN = 64
#: Longest socket path the kernel accepts (``sun_path`` minus its NUL).
_MAX_SOCKET_PATH = 107
_TOKEN_CHARS = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


def check_name(name: str) -> str:
    """Returns ``name`` if it is a valid service name, else raises ``InvalidName`` saying why.

    A name is dot-separated tokens of ``[A-Za-z0-9_-]``, 1 to 64 bytes, not starting with ``-``.
    """
    if not isinstance(name, str):
        raise TypeError(f"a service name is a str, not {type(name).__name__}")
    raw = name.encode("utf-8", "surrogatepass")
    why = None
    if not raw:
        why = "it is empty"
    elif len(raw) > MAX_NAME_LEN:
        why = "it is too long"
    elif raw.startswith(b"-"):
        why = "it starts with '-'"
    else:
        for token in raw.split(b"."):
            if not token:
                why = "it has an empty token (leading, trailing or doubled '.')"
                break
            if not _TOKEN_CHARS.issuperset(token):
                why = "it contains a character other than letters, digits, '_', '-' and '.'"
                break
    if why is not None:
        raise InvalidName(
            f"invalid service name {json.dumps(name)}: {why}; a name is dot-separated tokens of "
            f"letters, digits, '_' and '-', at most {MAX_NAME_LEN} bytes (e.g. LIFE_GEN)"
        )
    return name


def check_method(method: str) -> None:
    """Raises ``InvalidName`` unless ``method`` is 1-64 bytes of ``[A-Za-z0-9_.-]`` (after an
    optional ``$``, reserved for built-in methods)."""
    body = method[1:] if method.startswith("$") else method
    raw = body.encode("utf-8", "surrogatepass")
    if not raw or len(method.encode("utf-8", "surrogatepass")) > MAX_METHOD_LEN:
        raise InvalidName(
            f"method name {json.dumps(method)} must be 1 to {MAX_METHOD_LEN} bytes of letters, "
            "digits, '_', '-' or '.'"
        )
    bad = [c for c in body if not (c.isascii() and (c.isalnum() or c in "_-."))]
    if bad:
        raise InvalidName(
            f"method name {json.dumps(method)} contains {json.dumps(bad[0])}; only letters, "
            "digits, '_', '-' and '.' are allowed"
        )


def runtime_dir() -> str:
    """``$MICROCS_RUNTIME_DIR``, else ``$XDG_RUNTIME_DIR/microcs``, else ``/tmp/microcs-<uid>``."""
    d = os.environ.get("MICROCS_RUNTIME_DIR")
    if d:
        return d
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return os.path.join(xdg, "microcs")
    return f"/tmp/microcs-{os.geteuid()}"


def _check_dir(d: str, own: bool) -> bool:
    """False if ``d`` does not exist; raises ``PermissionDenied`` unless it is a real directory
    nobody else can write to (and, with ``own``, ours and closed to everyone else)."""
    try:
        st = os.lstat(d)
    except FileNotFoundError:
        return False
    except OSError as e:
        raise _error(Error, f"cannot inspect runtime directory {d}: {e}") from e
    why = None
    if stat.S_ISLNK(st.st_mode):
        why = "it is a symlink"
    elif not stat.S_ISDIR(st.st_mode):
        why = "it is not a directory"
    elif own and st.st_uid != os.geteuid():
        why = "it belongs to another user"
    elif own and st.st_mode & 0o077:
        why = "group or others have access"
    elif st.st_mode & 0o022:
        why = "group or others can write to it"
    if why is not None:
        raise PermissionDenied(
            f"refusing to use runtime directory {d} ({why}, owner uid {st.st_uid}, mode "
            f"{stat.S_IMODE(st.st_mode):04o}); it must be a directory owned by uid {os.geteuid()} "
            "with mode 0700 — fix it, or set MICROCS_RUNTIME_DIR to a private directory"
        )
    return True


def _ensure_dir(d: str) -> None:
    try:
        os.makedirs(d, mode=0o700, exist_ok=True)
    except OSError as e:
        raise _error(Error, f"cannot create runtime directory {d}: {e}") from e
    _check_dir(d, own=True)


def _socket_path(d: str, name: str) -> str:
    return _checked_socket_path(os.path.join(d, name + ".sock"))


def _checked_socket_path(path: str) -> str:
    n = len(os.fsencode(path))
    if n > _MAX_SOCKET_PATH:
        raise InvalidName(
            f"socket path {path} is {n} bytes, over the {_MAX_SOCKET_PATH}-byte limit of Unix socket "
            "addresses; use a shorter name or a shorter MICROCS_RUNTIME_DIR"
        )
    return path


def _open_lock(path: str, create: bool) -> int:
    flags = (os.O_RDWR | os.O_CREAT if create else os.O_RDONLY) | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags, 0o600)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        os.close(fd)
        raise PermissionError(f"{path} is not a regular file of this user")
    return fd


def _same_file(fd: int, path: str) -> bool:
    try:
        a, b = os.fstat(fd), os.lstat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _read_meta(fd: int) -> Optional[Dict[str, Any]]:
    """The owner's metadata: the first line of the lock file, as JSON."""
    try:
        line = os.pread(fd, 64 * 1024, 0).split(b"\n", 1)[0]
        meta = json.loads(line)
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and isinstance(meta.get("pid"), int) else None


def _remove_if_socket(path: str, ino: Optional[Tuple[int, int]] = None) -> None:
    """Removes ``path`` only if it is a socket (and, given ``ino``, that very socket)."""
    try:
        st = os.lstat(path)
        if stat.S_ISSOCK(st.st_mode) and (ino is None or ino == (st.st_dev, st.st_ino)):
            os.unlink(path)
    except OSError:
        pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0
    return pid > 0


# ---------------------------------------------------------------- instances (a shared name)
#
# A name may be served by several instances instead of one exclusive server, exactly as the
# Rust registry lays it out (docs/ARCHITECTURE.md "Instances"): every instance holds a *shared*
# flock on <name>.lock (which an exclusive server takes exclusively, so the two kinds never
# mix), and owns a slot <name>@<k>.lock (exclusive flock, metadata line, and at LOAD_OFFSET its
# open connections) with its socket <name>@<k>.sock. Clients pick the ready instance with the
# fewest connections.

#: Most instances one name can have (slots ``0 .. MAX_INSTANCES - 1``).
MAX_INSTANCES = 256
#: Where a slot file keeps its instance's open connections: 20 ASCII digits and a newline.
LOAD_OFFSET = 64 * 1024
_LOAD_LEN = 21
#: How often, about, a client of an instance looks whether another is less loaded (±50 %).
_RECHECK = 1.0


def _slot_lock_path(d: str, name: str, slot: int) -> str:
    return os.path.join(d, f"{name}@{slot}.lock")


def _slot_socket_path(d: str, name: str, slot: int) -> str:
    return _checked_socket_path(os.path.join(d, f"{name}@{slot}.sock"))


def _parse_slot(entry: str) -> Optional[Tuple[str, int]]:
    """``(name, k)`` for a file named ``<name>@<k>.lock`` (``k`` written as ``str(k)``)."""
    if not entry.endswith(".lock"):
        return None
    stem, at, k = entry[: -len(".lock")].rpartition("@")
    if not at or not (k.isascii() and k.isdigit()) or str(int(k)) != k or int(k) >= MAX_INSTANCES:
        return None
    return stem, int(k)


def _read_load(fd: int) -> int:
    """A slot file's load record (0 when not written yet or unreadable)."""
    try:
        record = os.pread(fd, _LOAD_LEN, LOAD_OFFSET)
    except OSError:
        return 0
    digits = record[: _LOAD_LEN - 1]
    return int(digits) if len(record) == _LOAD_LEN and digits.isdigit() else 0


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except OSError:
        return False


class _Instance(NamedTuple):
    """A live instance of a name, as a client sees it."""

    slot: int
    socket: str
    connections: int
    ready: bool
    pid: Optional[int]


def _instances(d: str, name: str) -> List[_Instance]:
    """The live instances of ``name`` in ``d``, by slot. Read-only: per slot file an ``open``, a
    non-blocking shared ``flock`` (it fails only while the owner holds its exclusive one) and
    two ``pread`` s."""
    try:
        entries = os.listdir(d)
    except OSError:
        return []
    out = []
    for entry in entries:
        parsed = _parse_slot(entry) if entry.startswith(name + "@") else None
        if parsed is None or parsed[0] != name:
            continue
        slot = parsed[1]
        sock = _slot_socket_path(d, name, slot)
        try:
            fd = _open_lock(os.path.join(d, entry), False)
        except PermissionError:
            # Another user's instances (a runtime directory named explicitly): their lock files
            # are private, so there is no load to read and no lock to test; the socket is the
            # evidence, and connecting tells the rest.
            if _is_socket(sock):
                out.append(_Instance(slot, sock, 0, True, None))
            continue
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            continue  # nobody holds it: a crashed instance's leftover
        except BlockingIOError:
            meta = _read_meta(fd)
            out.append(_Instance(slot, sock, _read_load(fd), bool(meta and meta.get("ready")), meta["pid"] if meta else None))
        except OSError:
            continue
        finally:
            os.close(fd)
    out.sort(key=lambda i: i.slot)
    return out


def _targets(d: str, name: str) -> List[Tuple[str, Optional[int]]]:
    """Where to connect for ``name``, best first, as ``(socket, slot)``: the exclusive socket when
    there is one; else the ready instances, fewest connections first, ties in random order (so
    that callers connecting at once spread instead of all taking the first slot)."""
    sock = _socket_path(d, name)
    if os.path.lexists(sock):
        return [(sock, None)]
    ready = [(i.connections, secrets.randbits(64), i) for i in _instances(d, name) if i.ready]
    ready.sort(key=lambda t: t[:2])
    return [(i.socket, i.slot) for _, _, i in ready]


def _better_instance(d: str, name: str, slot: int) -> Optional[Tuple[str, int]]:
    """Another ready instance with at least two connections fewer than ``slot`` (whose count
    includes ours), so that moving evens the load instead of swapping it."""
    found = _instances(d, name)
    mine = [i.connections for i in found if i.slot == slot]
    others = [(i.connections, secrets.randbits(64), i) for i in found if i.ready and i.slot != slot]
    if not mine or not others:
        return None
    best = min(others, key=lambda t: t[:2])[2]
    return (best.socket, best.slot) if best.connections + 2 <= mine[0] else None


def _instance_pids(d: str, name: str) -> List[int]:
    return [i.pid for i in _instances(d, name) if i.pid is not None]


def _name_taken(message: str, pid: Optional[int]) -> NameTaken:
    taken = NameTaken(message)
    taken.owner_pid = pid
    return taken


def _lock(path: str, op: int) -> Optional[int]:
    """Opens (creating, 0600) and locks ``path`` without blocking: the descriptor, or None when
    someone else holds a conflicting lock; retried when the file was unlinked meanwhile."""
    while True:
        try:
            fd = _open_lock(path, True)
        except OSError as e:
            raise _error(Error, f"cannot open lock file {path}: {e}") from e
        try:
            fcntl.flock(fd, op | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError as e:
            os.close(fd)
            raise _error(Error, f"cannot lock {path}: {e}") from e
        if _same_file(fd, path):
            return fd
        os.close(fd)  # its previous owner unlinked the file we locked: retry


def _holder_pid(path: str) -> Optional[int]:
    """The live pid in the metadata of a lock file someone holds."""
    try:
        fd = _open_lock(path, False)
    except OSError:
        return None
    try:
        meta = _read_meta(fd)
    finally:
        os.close(fd)
    return meta["pid"] if meta and _pid_alive(meta["pid"]) else None


def _reclaim_name_if_free(d: str, name: str) -> None:
    """Removes ``<name>.lock`` (and a stale ``<name>.sock``) when nobody holds the lock any more:
    what the last instance to leave does."""
    path = os.path.join(d, name + ".lock")
    try:
        fd = _open_lock(path, False)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if _same_file(fd, path):
            _remove_if_socket(_socket_path(d, name))
            os.unlink(path)
    except OSError:
        pass
    finally:
        os.close(fd)


class _Claim:
    """Ownership of a name: an exclusive ``flock`` on ``<dir>/<name>.lock``, held for life; or,
    for an instance (``shared``), that lock held shared and an instance slot held exclusively.

    The kernel drops the lock when the process dies, however it dies, so a lock that can be
    taken means the socket beside it is stale; a live owner is never displaced.
    """

    def __init__(self, d: str, name: str, shared: bool = False) -> None:
        self.dir, self.name = d, name
        self.sock_ino: Optional[Tuple[int, int]] = None
        self.fd: Optional[int] = None
        #: An instance's shared lock on ``<name>.lock``, and its slot.
        self.mode_fd: Optional[int] = None
        self.slot: Optional[int] = None
        self.connections = 0
        name_lock = os.path.join(d, name + ".lock")
        give_up = time.monotonic() + 0.5
        if shared:
            _slot_socket_path(d, name, MAX_INSTANCES - 1)  # the longest slot path must fit
            while (fd := _lock(name_lock, fcntl.LOCK_SH)) is None:
                pid = _holder_pid(name_lock)
                # A holder that is gone or has not written its metadata yet is momentary.
                if pid is not None or time.monotonic() >= give_up:
                    owner = f"process {pid}" if pid is not None else "another process"
                    raise _name_taken(
                        f"the name '{name}' is owned by {owner} as an exclusive server (in {d}), so no "
                        "instance can join it; stop that server and serve the name as shared instances "
                        "only, or pick another name", pid) from None
                time.sleep(0.002)
            self.mode_fd = fd
            # No exclusive server can be alive now: a socket a crashed one left would hide the
            # instances from clients.
            _remove_if_socket(_socket_path(d, name))
            for slot in range(MAX_INSTANCES):
                fd = _lock(_slot_lock_path(d, name, slot), fcntl.LOCK_EX)
                if fd is not None:
                    self.fd, self.slot = fd, slot
                    self.lock_path = _slot_lock_path(d, name, slot)
                    self.sock_path = _slot_socket_path(d, name, slot)
                    return
            self.release()
            raise NameTaken(
                f"the name '{name}' has all its {MAX_INSTANCES} instance slots taken (in {d}); stop some instances"
            )
        self.lock_path = name_lock
        self.sock_path = _socket_path(d, name)
        while (fd := _lock(name_lock, fcntl.LOCK_EX)) is None:
            pid = _holder_pid(name_lock)
            if pid is None:
                # Held without metadata: instances (shared locks), or an owner starting up.
                pids = _instance_pids(d, name)
                if pids:
                    listed = ", ".join(map(str, pids))
                    raise _name_taken(
                        f"the name '{name}' is served by {len(pids)} shared instance{'' if len(pids) == 1 else 's'} "
                        f"(pid {listed}, in {d}); to add a server to them, make it a shared instance too "
                        "(Server(..., shared=True), `microcs serve --shared`), or pick another name", pids[0])
            # A holder that is gone or has not written its metadata yet is momentary.
            if pid is not None or time.monotonic() >= give_up:
                owner = f"process {pid}" if pid is not None else "another process"
                raise _name_taken(
                    f"the name '{name}' is taken by {owner} (in {d}); stop that server or pick another name", pid)
            time.sleep(0.002)
        self.fd = fd

    def write_meta(self, meta: Mapping[str, Any]) -> None:
        line = (json.dumps(meta, separators=(",", ":")) + "\n").encode()
        assert self.fd is not None
        try:
            os.pwrite(self.fd, line, 0)
            os.ftruncate(self.fd, len(line))
        except OSError as e:
            raise _error(Error, f"cannot write {self.lock_path}: {e}") from e
        if self.slot is not None:
            self.set_connections(self.connections)  # the truncation took the load record too

    def set_connections(self, n: int) -> None:
        """An instance records its open connections (the load clients balance by): one pwrite."""
        self.connections = n
        if self.slot is not None and self.fd is not None:
            try:
                os.pwrite(self.fd, b"%020d\n" % n, LOAD_OFFSET)
            except OSError as e:
                _log.debug("cannot record the load in %s: %s", self.lock_path, e)

    def prepare_socket_path(self) -> None:
        """Removes a stale socket; refuses anything else at the path."""
        try:
            st = os.lstat(self.sock_path)
        except FileNotFoundError:
            return
        if stat.S_ISSOCK(st.st_mode):
            os.unlink(self.sock_path)
            return
        what = "a symlink" if stat.S_ISLNK(st.st_mode) else "a directory" if stat.S_ISDIR(st.st_mode) else "a regular file"
        raise PermissionDenied(
            f"refusing to replace {self.sock_path}: it is {what}, not a socket; remove it by hand if "
            "it is not needed"
        )

    def socket_bound(self) -> None:
        os.chmod(self.sock_path, 0o600)
        st = os.lstat(self.sock_path)
        self.sock_ino = (st.st_dev, st.st_ino)

    def release(self) -> None:
        """Removes our socket and the lock file (while still holding the lock), then unlocks."""
        fd, self.fd = self.fd, None
        if fd is None:
            self._leave_name()
            return
        if self.sock_ino is not None:
            _remove_if_socket(self.sock_path, self.sock_ino)
        if _same_file(fd, self.lock_path):
            try:
                os.unlink(self.lock_path)
            except OSError:
                pass
        os.close(fd)
        self._leave_name()

    def _leave_name(self) -> None:
        """An instance lets go of the name's shared lock, then removes its file if nobody else
        (no other instance, no exclusive server) holds it now."""
        mode_fd, self.mode_fd = self.mode_fd, None
        if mode_fd is not None:
            os.close(mode_fd)
            _reclaim_name_if_free(self.dir, self.name)

    def __del__(self) -> None:
        self.release()


class ServiceInfo:
    """A running service, as ``list_services()`` reports it."""

    __slots__ = ("name", "where", "pid", "uid", "host", "started", "protocol_version", "version", "id", "methods",
                 "socket", "instance", "connections")

    def __init__(self, name: str, meta: Mapping[str, Any], uid: int, sock: str, instance: Optional[int] = None,
                 connections: Optional[int] = None) -> None:
        self.name: str = name
        self.where: List[str] = ["local"]
        self.pid: Optional[int] = meta.get("pid")
        self.uid: Optional[int] = uid
        self.host: Optional[str] = None
        self.started: Optional[float] = meta.get("started_ms", 0) / 1000
        self.protocol_version: Optional[int] = meta.get("protocol")
        self.version: str = str(meta.get("version", ""))
        self.id: str = str(meta.get("id", ""))
        self.methods: List[str] = [str(m) for m in meta.get("methods", ())]
        self.socket: Optional[str] = sock
        #: The slot of one of several instances of the name (None: its exclusive server).
        self.instance: Optional[int] = instance
        #: An instance's open connections, as it records them (None for an exclusive server).
        self.connections: Optional[int] = connections

    def __repr__(self) -> str:
        slot = "" if self.instance is None else f" instance={self.instance}"
        return f"<ServiceInfo {self.name}{slot} pid={self.pid} methods={self.methods}>"


def list_services(runtime_dir: Union[str, "os.PathLike[str]", None] = None) -> List[ServiceInfo]:
    """The services running in the runtime directory, sorted by name (the instances of a name
    served by several by slot: one entry each).

    A service is listed only while its owner holds the name's lock, so a crashed server is never
    listed; its leftover files are removed on the way.
    """
    d = os.fspath(runtime_dir) if runtime_dir is not None else globals()["runtime_dir"]()
    if not _check_dir(d, own=True):
        return []
    out = []
    for entry in os.listdir(d):
        if not entry.endswith(".lock"):
            continue
        parsed = _parse_slot(entry)
        name, slot = parsed if parsed is not None else (entry[: -len(".lock")], None)
        try:
            check_name(name)
            fd = _open_lock(os.path.join(d, entry), False)
            sock = _socket_path(d, name) if slot is None else _slot_socket_path(d, name, slot)
        except (InvalidName, OSError):
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                meta = _read_meta(fd)
                # (A name's lock held by instances has no metadata: they are listed by slot.)
                if meta and meta.get("ready"):
                    load = None if slot is None else _read_load(fd)
                    out.append(ServiceInfo(name, meta, os.fstat(fd).st_uid, sock, slot, load))
                continue
            # Nobody holds it: the owner is gone. Reclaim, unless a new server re-created the
            # file between our open and our lock.
            if _same_file(fd, os.path.join(d, entry)):
                _remove_if_socket(sock)
                try:
                    os.unlink(os.path.join(d, entry))
                except OSError:
                    pass
        except OSError:
            pass
        finally:
            os.close(fd)
    out.sort(key=lambda i: (i.name, -1 if i.instance is None else i.instance))
    return out


# ---------------------------------------------------------------- the codec (§ 2, 3)


class Frame(NamedTuple):
    """One decoded frame."""

    kind: int
    flags: int
    id: int
    status: int
    deadline_ms: int
    method: bytes
    payload: bytes


class DecodeError(ProtocolError):
    """Bytes that cannot be a frame; ``status`` is the code of the ``Error`` answering them."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def encode_header(kind: int, id: int, method_len: int, payload_len: int, flags: int = 0, status: int = 0, deadline_ms: int = 0) -> bytes:
    """The length prefix and header of a frame with this method and payload length."""
    return _HEADER.pack(HEADER_LEN + method_len + payload_len, VERSION, kind, flags, id, status, method_len, deadline_ms)


def encode(kind: int, id: int = 0, payload: bytes = b"", method: bytes = b"", flags: int = 0, status: int = 0, deadline_ms: int = 0) -> bytes:
    """One whole frame."""
    return encode_header(kind, id, len(method), len(payload), flags, status, deadline_ms) + method + payload


def decode(buf: Union[bytes, bytearray], max_payload: int) -> Union[Tuple[Frame, int], int]:
    """The frame at the start of ``buf`` and the bytes it used, or the total number of bytes
    ``buf`` must hold before decoding can progress. Sizes are checked against ``max_payload``
    as soon as the prefix (then the header) is in, before anything is allocated.

    Raises ``DecodeError`` when the bytes cannot be a frame of this version.
    """
    n = len(buf)
    if n < PREFIX_LEN:
        return FRAME_OVERHEAD
    length: int = _U32.unpack_from(buf)[0]
    if length < HEADER_LEN:
        raise DecodeError(BAD_REQUEST, f"frame length {length} is shorter than the {HEADER_LEN}-byte header")
    if length > HEADER_LEN + MAX_METHOD_LEN + max_payload:
        raise DecodeError(TOO_LARGE, f"frame of {length} bytes is over the limit of {max_payload} bytes")
    if n < FRAME_OVERHEAD:
        return FRAME_OVERHEAD
    _, version, kind, flags, id, status, mlen, deadline_ms = _HEADER.unpack_from(buf)
    if version != VERSION:
        raise DecodeError(VERSION_UNSUPPORTED, f"protocol version {version} is not supported (this side speaks {VERSION})")
    body = length - HEADER_LEN
    if mlen > MAX_METHOD_LEN or mlen > body:
        raise DecodeError(BAD_REQUEST, f"method name length {mlen} is over {MAX_METHOD_LEN} or past the frame's end")
    if body - mlen > max_payload:
        raise DecodeError(TOO_LARGE, f"frame of {body - mlen} bytes is over the limit of {max_payload} bytes")
    total: int = PREFIX_LEN + length
    if n < total:
        return total
    start = FRAME_OVERHEAD + mlen
    method = bytes(buf[FRAME_OVERHEAD:start]) if mlen else b""
    return Frame(kind, flags, id, status, deadline_ms, method, bytes(buf[start:total])), total


def _parse_ack(payload: bytes) -> Optional[Tuple[int, int, int, str]]:
    """A ``HelloAck`` body: (max payload, max in flight, pid, name), or None if malformed."""
    if len(payload) < _ACK.size:
        return None
    max_payload, in_flight, pid, name_len = _ACK.unpack_from(payload)
    name = payload[_ACK.size : _ACK.size + name_len]
    if len(name) < name_len:
        return None
    try:
        return max_payload, in_flight, pid, name.decode()
    except UnicodeDecodeError:
        return None


class _Reader:
    """Reassembles frames from a socket by their length prefix."""

    __slots__ = ("sock", "buf", "ready", "large")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        #: A large frame read by `fill`, not yet taken by `frame`.
        self.ready: Optional[Frame] = None
        #: The last frame was large: read the next one's header alone first (see `fill`).
        self.large = False

    def pending(self) -> bool:
        """Bytes or a frame are buffered."""
        return bool(self.buf) or self.ready is not None

    def frame(self, limit: int) -> Union[Frame, int]:
        """A whole buffered frame (consumed), or the bytes needed for one."""
        if self.ready is not None:
            frame, self.ready = self.ready, None
            return frame
        r = decode(self.buf, limit)
        if isinstance(r, int):
            return r
        frame, used = r
        del self.buf[:used]
        self.large = False
        return frame

    def fill(self, needed: int) -> bool:
        """Reads what is there (at least one byte, waiting for it); False at end of stream.

        Frames of up to 64 KiB come in one read, several at a time. A larger one's payload is
        read in one piece with ``MSG_WAITALL`` into the bytes object handed out, so it is
        allocated and copied once; after a large frame the next header is read alone, so that
        none of the next payload lands in the buffer first.
        """
        buf = self.buf
        have = len(buf)
        if have >= FRAME_OVERHEAD and needed - have > _READ_CHUNK:
            return self._fill_large(needed)
        data = self.sock.recv(FRAME_OVERHEAD if self.large and not have else _READ_CHUNK)
        if not data:
            return False
        buf += data
        return True

    def _fill_large(self, needed: int) -> bool:
        buf = self.buf
        start = FRAME_OVERHEAD + buf[18] * 256 + buf[19]  # decode() checked the method length
        if len(buf) < start:
            data = self.sock.recv(start - len(buf), socket.MSG_WAITALL)
        else:
            want = needed - len(buf)
            data = self.sock.recv(want, socket.MSG_WAITALL)
            if len(data) == want:
                _, _, kind, flags, id, status, _, deadline_ms = _HEADER.unpack_from(buf)
                prefix = bytes(buf[start:])
                payload = b"".join((prefix, data)) if prefix else data
                self.ready = Frame(kind, flags, id, status, deadline_ms, bytes(buf[FRAME_OVERHEAD:start]), payload)
                buf.clear()
                self.large = True
                return True
        # The method, or part of the payload (a timeout or a signal ended the wait): buffered.
        if not data:
            return False
        buf += data
        return True


def _send(sock: socket.socket, parts: Tuple[bytes, ...]) -> None:
    """Writes every byte of ``parts``, without SIGPIPE. On failure raises ``_SendFailed``."""
    sent = 0
    try:
        if len(parts) == 1 or sum(len(p) for p in parts) <= _READ_CHUNK:
            data = b"".join(parts)
            n = sock.send(data, socket.MSG_NOSIGNAL)
            sent = n
            if n < len(data):
                view = memoryview(data)
                while sent < len(data):
                    sent += sock.send(view[sent:], socket.MSG_NOSIGNAL)
            return
        views = [memoryview(p) for p in parts if p]
        while views:
            n = sock.sendmsg(views, [], socket.MSG_NOSIGNAL)
            sent += n
            while views and n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            if views and n:
                views[0] = views[0][n:]
    except OSError as e:
        raise _SendFailed(sent, e) from e


class _SendFailed(Exception):
    def __init__(self, sent: int, error: OSError) -> None:
        super().__init__(error)
        self.sent = sent
        self.error = error


def _disconnect(e: OSError) -> bool:
    return e.errno in (errno.EPIPE, errno.ECONNRESET, errno.ECONNABORTED, errno.ENOTCONN)


def _timed_out(e: OSError) -> bool:
    """A socket timeout: ``SO_RCVTIMEO``/``SO_SNDTIMEO`` (EAGAIN) or Python's own."""
    return isinstance(e, (socket.timeout, BlockingIOError)) or e.errno in (errno.EAGAIN, errno.ETIMEDOUT)


def _set_timeout(sock: socket.socket, option: int, seconds: Optional[float]) -> None:
    """``SO_RCVTIMEO``/``SO_SNDTIMEO`` on a blocking socket (None: wait for ever)."""
    us = 0 if seconds is None else max(100, int(seconds * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, option, _TIMEVAL.pack(us // 1_000_000, us % 1_000_000))


def _deadline_ms(remaining: float) -> int:
    """Milliseconds left, rounded up, at least 1, at most u32::MAX (§ 8)."""
    return min(max(-int(-remaining * 1000 // 1), 1), 0xFFFFFFFF)


def _as_bytes(payload: object, what: str) -> bytes:
    if isinstance(payload, bytes):
        return payload
    if isinstance(payload, (bytearray, memoryview)):
        return bytes(payload)
    raise TypeError(f"{what} must be bytes, bytearray or memoryview, not {type(payload).__name__}")


# ---------------------------------------------------------------- the client (§ 6-8, 10, 12)


class _Conn:
    """One connection of a client, after its handshake."""

    __slots__ = ("sock", "reader", "max_request", "pid", "rcv_timeout")

    def __init__(self, sock: socket.socket, max_request: int, pid: int, rcv_timeout: float) -> None:
        self.sock = sock
        self.reader = _Reader(sock)
        self.max_request = max_request
        self.pid = pid
        self.rcv_timeout = rcv_timeout


class _NotRun:
    """An attempt that provably did not run: it may be sent once more, on a new connection."""

    __slots__ = ("error",)

    def __init__(self, error: Error) -> None:
        self.error = error


class Client:
    """A blocking connection to a named service.

    Connects at once (``NoService`` if nobody serves the name). One request at a time; threads
    sharing a client take turns. After the server restarts the next request reconnects by
    itself; a request is sent again only when it provably never ran (see ``Error.may_have_run``).
    """

    def __init__(
        self,
        name: str,
        timeout: float = DEFAULT_TIMEOUT,
        *,
        runtime_dir: Union[str, "os.PathLike[str]", None] = None,
        max_frame: Optional[int] = None,
    ) -> None:
        self._name = check_name(name)
        self._explicit_dir = runtime_dir is not None
        self._dir = os.fspath(runtime_dir) if runtime_dir is not None else globals()["runtime_dir"]()
        self._path = _socket_path(self._dir, name)
        #: The instance slot connected to (None: the name's exclusive server), and when to look
        #: again whether another instance is less loaded.
        self._slot: Optional[int] = None
        self._recheck = 0.0
        self.timeout = timeout
        self._max_payload = DEFAULT_MAX_PAYLOAD if max_frame is None else int(max_frame)
        self._limit = max(self._max_payload, HANDSHAKE_PAYLOAD)
        # Ids are never reused, not even across reconnections: a late answer to a request given
        # up on can never be taken for a later one's.
        self._next_id = 1
        self._lock = threading.Lock()
        self._closed = False
        self._conn: Optional[_Conn] = None
        self._conn = self._open(time.monotonic() + self._timeout)

    @property
    def name(self) -> str:
        """The service name."""
        return self._name

    @property
    def timeout(self) -> float:
        """Seconds each request may take (the server sees the deadline)."""
        return self._timeout

    @timeout.setter
    def timeout(self, value: float) -> None:
        value = float(value)
        if not value > 0 or value != value or value == float("inf"):
            raise ValueError(f"timeout must be a positive number of seconds, not {value}")
        self._timeout = value

    @property
    def server_pid(self) -> Optional[int]:
        """The server's process id, from the handshake (None while disconnected)."""
        return self._conn.pid if self._conn else None

    @property
    def socket_path(self) -> str:
        """The socket connected to: the name's own, or the socket of the instance reached."""
        return self._path

    @property
    def via(self) -> str:
        """Where requests go: always ``"local"`` (no NATS here)."""
        return "local"

    @property
    def closed(self) -> bool:
        return self._closed

    def request(self, payload: Union[bytes, bytearray, memoryview]) -> bytes:
        """Sends ``payload`` to the default handler; returns the reply."""
        return self._exchange(b"", _as_bytes(payload, "payload"))

    def call(self, method: str, payload: Union[bytes, bytearray, memoryview, None] = None) -> bytes:
        """Calls the method ``method`` with ``payload``; returns the reply."""
        check_method(method)
        return self._exchange(method.encode(), b"" if payload is None else _as_bytes(payload, "payload"))

    def send_message(self, message: str) -> str:
        """Sends text to the default handler; returns the reply as text (the seed's verb)."""
        if not isinstance(message, str):
            raise TypeError(f"message must be str, not {type(message).__name__}")
        reply = self._exchange(b"", message.encode())
        try:
            return reply.decode()
        except UnicodeDecodeError:
            raise ProtocolError(
                f"service '{self._name}' replied with bytes that are not UTF-8 text; use request() for bytes"
            ) from None

    def ping(self) -> Dict[str, Any]:
        """The service's ``$ping`` answer."""
        return self._builtin("$ping")

    def info(self) -> Dict[str, Any]:
        """The service's ``$info`` answer (name, version, endpoints)."""
        return self._builtin("$info")

    def stats(self) -> Dict[str, Any]:
        """The service's ``$stats`` answer."""
        return self._builtin("$stats")

    def close(self) -> None:
        """Closes the connection; later calls raise ``Closed``. Idempotent."""
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<microcs_lite.Client {self._name!r} pid={self.server_pid}>"

    def _builtin(self, method: str) -> Dict[str, Any]:
        reply = self._exchange(method.encode(), b"")
        try:
            doc = json.loads(reply)
            if not isinstance(doc, dict):
                raise ValueError("not an object")
        except ValueError as e:
            raise ProtocolError(f"service '{self._name}' sent an invalid {method} answer: {e}") from None
        return doc

    def _exchange(self, method: bytes, payload: bytes) -> bytes:
        with self._lock:
            if self._closed:
                raise Closed(f"the client of service '{self._name}' is closed")
            now = time.monotonic()
            deadline = now + self._timeout
            if self._slot is not None and now >= self._recheck and self._conn is not None:
                self._rebalance(deadline)
            resent = False  # at most one resend, and only of a request that provably did not run
            while True:
                if self._conn is None:
                    self._conn = self._open(deadline)
                r = self._attempt(self._conn, method, payload, deadline)
                if type(r) is bytes:
                    return r
                assert isinstance(r, _NotRun)
                if resent:
                    raise r.error
                self._drop()
                resent = True

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.sock.close()

    def _attempt(self, conn: _Conn, method: bytes, payload: bytes, deadline: float) -> Union[bytes, _NotRun]:
        name = self._name
        if len(payload) > conn.max_request:
            raise FrameTooLarge(
                f"payload of {len(payload)} bytes is over service '{name}''s limit of "
                f"{conn.max_request} bytes; nothing was sent"
            )
        id = self._next_id
        self._next_id = id + 1 if id < 0xFFFFFFFFFFFFFFFF else 1
        head = _HEADER.pack(
            HEADER_LEN + len(method) + len(payload), VERSION, REQUEST, 0, id, 0, len(method),
            _deadline_ms(deadline - time.monotonic()),
        )
        try:
            if len(payload) < _READ_CHUNK:  # the usual case, in one system call
                data = head + method + payload
                try:
                    n = conn.sock.send(data, socket.MSG_NOSIGNAL)
                except OSError as first:
                    raise _SendFailed(0, first) from None
                if n < len(data):
                    try:
                        _send(conn.sock, (data[n:],))
                    except _SendFailed as rest:
                        raise _SendFailed(n + rest.sent, rest.error) from None
            else:
                _send(conn.sock, (head, method, payload))
        except _SendFailed as failed:
            self._drop()
            if _timed_out(failed.error):
                # Part of it may be in the socket, but a frame cut short never runs.
                raise TimedOut(
                    f"service '{name}' did not take the request within {_secs(self._timeout)}; it did not run"
                ) from None
            e = self._lost(failed.error, may_have_run=False)
            if failed.sent == 0:
                return _NotRun(e)  # not a byte reached the socket: it cannot have run
            raise e from None
        reader, sock, limit = conn.reader, conn.sock, self._limit
        while True:
            try:
                f = reader.frame(limit) if reader.pending() else FRAME_OVERHEAD
            except DecodeError as e:
                self._drop()
                raise _error(
                    ProtocolError,
                    f"service '{name}' sent bytes that are not a valid microcs frame ({e}); is it a microcs service?",
                    True,
                ) from None
            if isinstance(f, int):
                self._wait(conn, f, id, deadline)
                continue
            if f.id == id:
                if f.kind == REPLY:
                    return f.payload
                if f.kind == ERROR:
                    err = _from_remote(name, f.status, f.flags, f.payload.decode("utf-8", "replace"))
                    if f.status == BUSY and f.flags & FLAG_NOT_RUN:
                        return _NotRun(err)  # the server was shutting down: it did not run
                    raise err
            if f.kind == ERROR and f.id == 0:
                # The connection ended: everything on it is lost.
                self._drop()
                raise _from_remote(name, f.status, f.flags, f.payload.decode("utf-8", "replace"))
            # Late answers to requests given up on, pings: not ours, dropped.

    def _wait(self, conn: _Conn, needed: int, id: int, deadline: float) -> None:
        """Reads more of the answer to request ``id`` (raising when the wait ends without it)."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            self._give_up(conn, id)
        # SO_RCVTIMEO bounds each read; reset only when off by more than a millisecond, so that
        # requests with the same timeout cost no extra system call.
        if abs(conn.rcv_timeout - remaining) > 0.001:
            _set_timeout(conn.sock, socket.SO_RCVTIMEO, remaining)
            conn.rcv_timeout = remaining
        try:
            if conn.reader.fill(needed):
                return
            error: Optional[OSError] = None
        except OSError as e:
            if _timed_out(e):
                if time.monotonic() >= deadline:
                    self._give_up(conn, id)
                return
            error = e
        except BaseException:
            # Ctrl-C (or another exception from a signal handler): stop waiting. The connection
            # goes too (the server cancels what it carried): the exception may have come between
            # a read and the buffering of its bytes, so the stream is no longer to be trusted.
            self._cancel(conn, id)
            self._drop()
            raise
        self._drop()
        if error is None:
            raise _error(Closed, f"service '{self._name}' closed the connection; the request may have run", True)
        raise self._lost(error, may_have_run=True)

    def _lost(self, e: OSError, may_have_run: bool) -> Error:
        tail = "; the request may have run" if may_have_run else ""
        if _disconnect(e):
            return _error(Closed, f"connection to service '{self._name}' broke: {e}{tail}", may_have_run)
        return _error(Error, f"connection to service '{self._name}' failed: {e}{tail}", may_have_run)

    def _give_up(self, conn: _Conn, id: int) -> None:
        self._cancel(conn, id)
        raise _error(
            TimedOut,
            f"service '{self._name}' did not answer within {_secs(self._timeout)}; the request may have run",
            True,
        )

    def _cancel(self, conn: _Conn, id: int) -> None:
        """Tells the server to stop working on request ``id``; best effort (a late answer is
        dropped by its id)."""
        try:
            conn.sock.send(encode(CANCEL, id), socket.MSG_NOSIGNAL | socket.MSG_DONTWAIT)
        except OSError:
            pass

    def _open(self, deadline: float) -> _Conn:
        """Connects and shakes hands: to the name's exclusive server, or to the least-loaded of
        its instances that answers (one that died since we looked is skipped)."""
        name = self._name
        if not _check_dir(self._dir, own=not self._explicit_dir):
            raise NoService(f"no service named '{name}' is running (looked in {self._dir})")
        last: Optional[Error] = None
        for path, slot in _targets(self._dir, name):
            try:
                conn = self._connect(path, deadline)
            except (NoService, Closed) as e:
                if slot is None:
                    raise
                last = e  # gone since we looked, or dying during the handshake: the next one
                continue
            self._path, self._slot = path, slot
            self._recheck = time.monotonic() + _RECHECK * (0.5 + secrets.randbelow(1000) / 1000)
            return conn
        if last is not None:
            raise last
        raise NoService(f"no service named '{name}' is running (looked in {self._dir})")

    def _rebalance(self, deadline: float) -> None:
        """Connected to an instance, and its time to look at the others has come: moves to a
        less-loaded one, if there is one and it answers (else stays)."""
        assert self._slot is not None
        self._recheck = time.monotonic() + _RECHECK * (0.5 + secrets.randbelow(1000) / 1000)
        better = _better_instance(self._dir, self._name, self._slot)
        if better is None:
            return
        try:
            conn = self._connect(better[0], deadline)
        except Error as e:
            _log.debug("service '%s': a less-loaded instance did not answer: %s", self._name, e)
            return
        self._drop()
        self._conn = conn
        self._path, self._slot = better

    def _connect(self, path: str, deadline: float) -> _Conn:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            return self._handshake(sock, deadline, path)
        except BaseException:
            sock.close()
            raise

    def _handshake(self, sock: socket.socket, deadline: float, path: str) -> _Conn:
        name = self._name
        remaining = max(deadline - time.monotonic(), 0.001)
        sock.settimeout(remaining)
        try:
            sock.connect(path)
        except FileNotFoundError:
            raise NoService(f"no service named '{name}' is running (looked in {self._dir})") from None
        except ConnectionRefusedError:
            raise NoService(
                f"no service named '{name}' is running (looked in {self._dir}; found only a stale socket)"
            ) from None
        except (socket.timeout, BlockingIOError):
            raise TimedOut(
                f"service '{name}' did not accept the connection within {_secs(self._timeout)}"
            ) from None
        except OSError as e:
            raise _error(Error, f"cannot connect to {path}: {e}") from e
        sock.setblocking(True)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        _set_timeout(sock, socket.SO_SNDTIMEO, self._timeout)
        _set_timeout(sock, socket.SO_RCVTIMEO, remaining)
        # A server that refuses us (busy, another user) writes why and closes without reading:
        # our hello may then fail with EPIPE, but its answer is still there to read.
        sent: Optional[OSError] = None
        try:
            _send(sock, (encode(HELLO, 0, _U32.pack(self._max_payload)),))
        except _SendFailed as failed:
            sent = failed.error
        reader = _Reader(sock)
        not_microcs = f"{path} is not a microcs service"
        while True:
            try:
                f = reader.frame(self._limit)
            except DecodeError as e:
                raise ProtocolError(f"{not_microcs}: it sent bytes that are not a microcs frame ({e})") from None
            if isinstance(f, Frame):
                break
            try:
                more = reader.fill(f)
            except OSError as e:
                if _timed_out(e) and time.monotonic() < deadline:
                    continue
                if _timed_out(e):
                    raise TimedOut(
                        f"service '{name}' did not answer the handshake in time; is {path} a microcs service?"
                    ) from None
                raise _error(Error, f"handshake with service '{name}' failed: {sent or e}") from e
            if not more:
                if sent is not None:
                    raise _error(Error, f"handshake with service '{name}' failed: {sent}")
                raise Closed(f"service '{name}' closed the connection during the handshake")
        if f.kind == ERROR:
            refused = _from_remote(name, f.status, f.flags, f.payload.decode("utf-8", "replace"))
            refused.may_have_run = False
            raise refused
        ack = _parse_ack(f.payload) if f.kind == HELLO_ACK else None
        if ack is None:
            why = "its handshake answer is malformed" if f.kind == HELLO_ACK else "it answered the handshake with an unexpected frame"
            raise ProtocolError(f"{not_microcs}: {why}")
        conn = _Conn(sock, ack[0], ack[2], remaining)
        conn.reader = reader
        return conn


# ---------------------------------------------------------------- the server (§ 6-11, 13)


class Request:
    """One call, as a handler that takes a second parameter receives it."""

    __slots__ = ("method", "payload", "pid", "uid", "gid", "id", "_deadline", "_call")

    via = "local"

    def __init__(self, method: Optional[str], payload: bytes, peer: Tuple[int, int, int], id: int, deadline: Optional[float], call: _Call) -> None:
        self.method = method
        self.payload = payload
        self.pid, self.uid, self.gid = peer
        self.id = id
        self._deadline = deadline
        self._call = call

    @property
    def deadline(self) -> Optional[float]:
        """The caller's deadline on the ``time.monotonic()`` clock, or None."""
        return self._deadline

    @property
    def remaining(self) -> Optional[float]:
        """Seconds left before the caller's deadline (0.0 once passed), or None."""
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def is_cancelled(self) -> bool:
        """True once nobody wants the answer (cancelled, disconnected, or past the deadline)."""
        return self._call.cancelled or (self._deadline is not None and time.monotonic() >= self._deadline)

    def __repr__(self) -> str:
        return f"<microcs_lite.Request id={self.id} method={self.method!r} payload={len(self.payload)} bytes pid={self.pid} uid={self.uid}>"


class _Call:
    """A request in flight; ``cancelled`` once its caller cancels or leaves."""

    __slots__ = ("cancelled",)

    def __init__(self) -> None:
        self.cancelled = False


class _Endpoint:
    """A handler and its ``$stats`` counters."""

    def __init__(self, name: str, subject: str, func: Optional[Callable[..., Any]], text: bool) -> None:
        self.name = name
        self.subject = subject
        self.func = func
        self.with_request = func is not None and _wants_request(func)
        self.text = text
        self.requests = self.errors = self.processing_ns = 0
        self.last_error = ""
        self.lock = threading.Lock()

    def record(self, ns: int, error: Optional[str]) -> None:
        with self.lock:
            self.requests += 1
            self.processing_ns += ns
            if error is not None:
                self.errors += 1
                self.last_error = error

    def stats(self) -> Dict[str, Any]:
        n, t = self.requests, self.processing_ns
        return {
            "name": self.name, "subject": self.subject, "queue_group": "q", "num_requests": n,
            "num_errors": self.errors, "last_error": self.last_error, "processing_time": t,
            "average_processing_time": t // n if n else 0,
        }


def _wants_request(func: Callable[..., Any]) -> bool:
    """Whether ``func`` takes a second positional argument (the Request): two positional
    parameters without defaults, or ``*args``."""
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return False
    required = 0
    for p in params:
        if p.kind == p.VAR_POSITIONAL:
            return True
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty:
            required += 1
    return required >= 2


def _reply_bytes(obj: object) -> bytes:
    if isinstance(obj, bytes):
        return obj
    if isinstance(obj, str):
        try:
            return obj.encode()
        except UnicodeEncodeError as e:
            raise _BadReply(f"UnicodeEncodeError: the handler's reply is not valid text: {e}") from None
    if isinstance(obj, (bytearray, memoryview)):
        return bytes(obj)
    raise _BadReply(f"TypeError: the handler returned {type(obj).__name__}; it must return bytes or str")


class _BadReply(Exception):
    pass


def _rfc3339(ns: int) -> str:
    secs, frac = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{frac:09d}Z"


def _instance_id() -> str:
    alphabet = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
    return "".join(secrets.choice(alphabet) for _ in range(22))


class _SConn:
    """One accepted connection, shared by the threads serving it."""

    def __init__(self, sock: socket.socket, peer: Tuple[int, int, int], number: int) -> None:
        self.sock = sock
        self.peer = peer
        self.number = number
        self.accepted = time.monotonic()
        self.reader = _Reader(sock)
        #: The client's reply limit, from its Hello (HANDSHAKE_PAYLOAD until then).
        self.max_reply = HANDSHAKE_PAYLOAD
        #: Requests in flight by id (so that Cancel, or the peer leaving, reaches them).
        self.inflight: Dict[int, _Call] = {}
        #: Whoever holds it reads the socket.
        self.read_lock = threading.Lock()
        self.write_lock = threading.Lock()
        self.lock = threading.Lock()
        self.running = 0
        self.threads = 1
        self.reader_active = True
        self.unattended_since = 0.0
        self.pending_buffered = False
        self.partial_timeout = False
        self.partial_since: Optional[float] = None
        self.handshaken = False
        self.closed = False
        #: We shut the read side (shutdown): the EOF that follows is not the peer leaving.
        self.read_shut = False

    def cancel_all(self) -> None:
        with self.lock:
            for c in self.inflight.values():
                c.cancelled = True

    def shut(self, how: int) -> None:
        try:
            self.sock.shutdown(how)
        except OSError:
            pass

    def close(self) -> None:
        self.closed = True
        self.shut(socket.SHUT_RDWR)


#: A request taken off the wire: the frame, its call, its absolute deadline.
_Job = Tuple[Frame, _Call, Optional[float]]
_TICK = 0.005
_IDLE_TICKS = 200


class Server:
    """Serves a name with a Python handler; one thread per connection.

    The name is claimed when the object is created (``NameTaken`` if a live server has it).
    With ``shared=True`` it joins the name as one of several instances instead (each a process
    of its own, or not: Rust ones too), and callers are spread over them; an exclusive server
    and instances never serve one name together (``NameTaken`` says which is there).
    ``start_listening()``/``serve()`` serve on this thread until ``stop()`` or Ctrl-C;
    ``start()`` (or ``with``) serves in background threads. A handler gets the payload (``str``
    with ``text=True``), and the ``Request`` too when it takes a second parameter; it returns
    bytes or str. An exception reaches the caller as ``RemoteError`` (500, or the code of a
    ``RemoteError`` it raised); the server goes on.
    """

    def __init__(
        self,
        handler: Optional[Callable[..., Any]],
        name: str,
        *,
        text: bool = False,
        methods: Optional[Mapping[str, Callable[..., Any]]] = None,
        runtime_dir: Union[str, "os.PathLike[str]", None] = None,
        max_frame: Optional[int] = None,
        max_connections: Optional[int] = None,
        max_in_flight: Optional[int] = None,
        grace_period: Optional[float] = None,
        version: Optional[str] = None,
        description: Optional[str] = None,
        metadata: Optional[Mapping[str, str]] = None,
        handshake_timeout: float = 5.0,
        frame_timeout: float = 10.0,
        write_timeout: float = 30.0,
        shared: bool = False,
    ) -> None:
        check_name(name)
        if handler is not None and not callable(handler):
            raise TypeError(f"the handler for service '{name}' must be callable, not {type(handler).__name__}")
        self._name = name
        self._text = text
        self._dir = os.fspath(runtime_dir) if runtime_dir is not None else globals()["runtime_dir"]()
        self._max_payload = DEFAULT_MAX_PAYLOAD if max_frame is None else int(max_frame)
        self._max_connections = max(1, max_connections or 1024)
        self._max_in_flight = max(1, max_in_flight or 128)
        self._max_handshaking = 64
        self._grace = 10.0 if grace_period is None else float(grace_period)
        self._handshake_timeout = handshake_timeout
        self._frame_timeout = frame_timeout
        self._write_timeout = write_timeout
        self._version = version or "0.1.0"
        self._description = description or ""
        self._metadata = dict(metadata or {})
        self._default = _Endpoint("default", name, handler, text)
        self._methods: Dict[str, _Endpoint] = {}
        self._id = ""
        self._started_ns = time.time_ns()
        self._state = "bound"
        self._state_lock = threading.Lock()
        self._stopped = threading.Event()
        self._stopping = False
        self._lock = threading.Lock()
        self._drained = threading.Condition(self._lock)
        self._conns: Dict[int, _SConn] = {}
        self._handshaking = 0
        self._next_conn = 1
        self._threads: List[threading.Thread] = []
        self._sentinel_wake = threading.Event()
        self._sentinel_parked = False
        self._was_running = False
        for m, h in (methods or {}).items():
            self.method(m, h)
        _ensure_dir(self._dir)
        self._claim: Optional[_Claim] = _Claim(self._dir, name, shared)
        self._socket_path = self._claim.sock_path
        self._slot = self._claim.slot
        try:
            self._claim.prepare_socket_path()
            self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self._listener.bind(self._claim.sock_path)
            except OSError as e:
                raise _error(Error, f"cannot bind {self._claim.sock_path}: {e}") from e
            self._claim.socket_bound()
            self._listener.listen(1024)
            self._listener.setblocking(False)
            # The owner's pid for competitors' NameTaken; not listed until it serves.
            self._claim.write_meta(self._meta(ready=False))
        except BaseException:
            self._claim.release()
            raise
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)

    # -- the public API

    @property
    def name(self) -> str:
        return self._name

    @property
    def text(self) -> bool:
        return self._text

    @property
    def running(self) -> bool:
        return self._state == "running"

    @property
    def socket_path(self) -> str:
        """The socket it serves on: the name's own, or (``shared=True``) its instance slot's."""
        return self._socket_path

    @property
    def instance(self) -> Optional[int]:
        """Its instance slot when it joined the name with ``shared=True``, else None."""
        return self._slot

    def method(self, name: str, handler: Optional[Callable[..., Any]] = None) -> Any:
        """Adds a named method: ``server.method("step", f)``, or as a decorator
        ``@server.method("step")``. Before ``start()`` only."""
        if handler is None:
            def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
                self.method(name, func)
                return func
            return decorate
        check_method(name)
        if name.startswith("$"):
            raise InvalidName(f"method name {json.dumps(name)}: names starting with '$' are reserved for built-in methods")
        if not callable(handler):
            raise TypeError(f"the handler for method '{name}' of service '{self._name}' must be callable, not {type(handler).__name__}")
        if name in self._methods:
            raise InvalidName(f"method {json.dumps(name)} is registered twice")
        if self._state != "bound":
            raise RuntimeError(f"server '{self._name}' is already serving; add methods before start()")
        self._methods[name] = _Endpoint(name, f"{self._name}.{name}", handler, self._text)
        return handler

    def start(self) -> None:
        """Serves in background threads and returns at once; nothing if already serving."""
        with self._state_lock:
            if self._state == "running":
                return
            if self._state != "bound":
                raise Closed(f"server '{self._name}' was stopped; create a new Server to serve the name again")
            self._methods = dict(sorted(self._methods.items()))
            self._id = _instance_id()
            assert self._claim is not None
            self._claim.write_meta(self._meta(ready=True))
            for target in (self._accept_loop, self._sentinel):
                t = threading.Thread(target=target, name=f"microcs-{target.__name__.strip('_')}", daemon=True)
                t.start()
                self._threads.append(t)
            self._state = "running"
            _RUNNING.add(self)

    def serve(self, timeout: Optional[float] = None) -> None:
        """Serves until ``stop()``, ``timeout`` seconds, or Ctrl-C (which stops the server, frees
        the name, then raises ``KeyboardInterrupt``)."""
        self.start()
        end = None if timeout is None else time.monotonic() + timeout
        try:
            while not self._stopped.is_set():
                left = 0.05 if end is None else min(0.05, end - time.monotonic())
                if left <= 0:
                    break
                self._stopped.wait(left)
        finally:
            self.stop()

    def start_listening(self, timeout: Optional[float] = None) -> None:
        """The original course project's name for ``serve()``."""
        self.serve(timeout)

    def stop(self) -> None:
        """Stops serving, lets running handlers finish (within the grace period), frees the name.

        Idempotent; from a handler it returns at once and the server drains in the background.
        """
        owner = self._begin_stop()
        if getattr(_in_handler, "server", None) is self:
            if owner:
                threading.Thread(target=self._drain, name="microcs-stop", daemon=True).start()
        elif owner:
            self._drain()
        else:
            self._stopped.wait()

    def stats(self) -> Dict[str, Any]:
        """The ``$stats`` counters (requests, errors, timings per endpoint)."""
        return self._stats()

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<microcs_lite.Server {self._name!r} {self._state}>"

    # -- identity and built-ins (§ 13)

    def _meta(self, ready: bool) -> Dict[str, Any]:
        return {
            "pid": os.getpid(), "uid": os.geteuid(), "started_ms": self._started_ns // 1_000_000,
            "protocol": VERSION, "version": self._version, "id": self._id if ready else "",
            "methods": [*self._methods] if ready else [], "ready": ready,
        }

    def _head(self, kind: str) -> Dict[str, Any]:
        meta = dict(self._metadata)
        meta.update(pid=str(os.getpid()), uid=str(os.geteuid()), host=socket.gethostname(),
                    protocol=str(VERSION), library=f"microcs-lite {__version__}")
        return {"type": f"io.nats.micro.v1.{kind}_response", "name": self._name, "id": self._id,
                "version": self._version, "metadata": dict(sorted(meta.items()))}

    def _endpoints(self) -> List[_Endpoint]:
        return [self._default, *self._methods.values()]

    def _stats(self) -> Dict[str, Any]:
        doc = self._head("stats")
        doc["started"] = _rfc3339(self._started_ns)
        doc["endpoints"] = [e.stats() for e in self._endpoints()]
        return doc

    def _builtin(self, method: bytes) -> Optional[bytes]:
        if method == b"$ping":
            doc = self._head("ping")
        elif method == b"$info":
            doc = self._head("info")
            doc["description"] = self._description
            doc["endpoints"] = [{"name": e.name, "subject": e.subject, "queue_group": "q", "metadata": None} for e in self._endpoints()]
        elif method == b"$stats":
            doc = self._stats()
        else:
            return None
        return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()

    # -- accepting (§ 6.1)

    def _accept_loop(self) -> None:
        poller = select.poll()
        poller.register(self._listener, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        backoff = 0.005
        while True:
            poller.poll()
            # Once stopping, what already waits in the backlog is still taken (its requests get
            # 503 FLAG_NOT_RUN), rather than reset when the listener closes.
            stopping = self._stopping
            while True:
                try:
                    sock, _ = self._listener.accept()
                except BlockingIOError:
                    break
                except (InterruptedError, ConnectionAbortedError):
                    continue
                except OSError as e:
                    # Out of descriptors or memory: back off instead of spinning on a listener
                    # that stays readable; connections wait in the backlog meanwhile.
                    _log.warning("accept failed for service '%s': %s; backing off %.3f s", self._name, e, backoff)
                    time.sleep(backoff)
                    backoff = min(backoff * 2, 0.2)
                    break
                backoff = 0.005
                try:
                    self._on_accept(sock)
                except Exception:  # pragma: no cover - never expected; keep accepting
                    _log.exception("cannot set up a connection of service '%s'", self._name)
                    sock.close()
            if stopping:
                return

    def _refuse(self, sock: socket.socket, code: int, message: str) -> None:
        """Answers a connection before reading a byte of it, and closes it."""
        try:
            sock.settimeout(1.0)
            sock.send(encode(ERROR, 0, message.encode(), flags=FLAG_SYSTEM | FLAG_NOT_RUN, status=code), socket.MSG_NOSIGNAL)
        except OSError:
            pass
        sock.close()

    def _on_accept(self, sock: socket.socket) -> None:
        sock.setblocking(True)
        try:
            peer = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
        except OSError as e:
            _log.warning("cannot read peer credentials; dropping connection: %s", e)
            sock.close()
            return
        if peer[1] != os.geteuid():
            _log.warning("service '%s' refused a peer of another user (uid %d, pid %d)", self._name, peer[1], peer[0])
            msg = f"user {peer[1]} may not use service '{self._name}' (it serves uid {os.geteuid()} only)"
            return self._refuse(sock, PERMISSION_DENIED, msg)
        with self._lock:
            if len(self._conns) >= self._max_connections:
                full = True
            else:
                full = False
                if self._handshaking >= self._max_handshaking:
                    # Make room by dropping the oldest connection that has not said hello yet.
                    silent = [c for c in self._conns.values() if not c.handshaken and not c.closed]
                    if silent:
                        min(silent, key=lambda c: c.accepted).close()
                conn = _SConn(sock, peer, self._next_conn)
                self._next_conn += 1
                self._conns[conn.number] = conn
                self._record_connections()
                self._handshaking += 1
        if full:
            msg = f"service '{self._name}' is at its limit of {self._max_connections} connections; try again later"
            return self._refuse(sock, BUSY, msg)
        _set_timeout(sock, socket.SO_SNDTIMEO, self._write_timeout)
        _set_timeout(sock, socket.SO_RCVTIMEO, self._handshake_timeout)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        try:
            threading.Thread(target=self._conn_thread, args=(conn, True), name="microcs-conn", daemon=True).start()
        except RuntimeError:
            with self._lock:
                self._handshaking -= 1
            self._send(conn, ERROR, 0, b"service is out of threads; try again later", FLAG_SYSTEM | FLAG_NOT_RUN, BUSY)
            conn.close()
            self._leave(conn)

    # -- one connection's threads

    def _record_connections(self) -> None:
        """An instance's load record, under ``self._lock`` (so that records never land out of
        order, and never after ``_begin_stop`` took the claim)."""
        if self._claim is not None and self._slot is not None:
            self._claim.set_connections(len(self._conns))

    def _conn_thread(self, conn: _SConn, first: bool) -> None:
        try:
            if first:
                ok = self._handshake(conn)
                with self._lock:
                    self._handshaking -= 1
                if ok:
                    conn.handshaken = True
                    self._serve_conn(conn)
                else:
                    conn.close()
            else:
                self._serve_conn(conn)
        finally:
            self._leave(conn)

    def _leave(self, conn: _SConn) -> None:
        with self._lock:
            conn.threads -= 1
            if conn.threads:
                return
            self._conns.pop(conn.number, None)
            self._record_connections()
            self._drained.notify_all()
        conn.cancel_all()
        conn.closed = True
        conn.sock.close()

    def _handshake(self, conn: _SConn) -> bool:
        """Reads the client's Hello within the handshake timeout and answers it."""
        with conn.read_lock:
            while True:
                try:
                    f = conn.reader.frame(self._max_payload)
                except DecodeError as e:
                    self._reject(conn, e)
                    return False
                if isinstance(f, Frame):
                    if f.kind != HELLO or len(f.payload) < 4:
                        self._send(conn, ERROR, 0, b"expected a Hello frame first", FLAG_SYSTEM | FLAG_NOT_RUN, BAD_REQUEST)
                        return False
                    ack = _ACK.pack(self._max_payload, self._max_in_flight, os.getpid(), len(self._name.encode())) + self._name.encode()
                    ack += _U32.pack(0)  # features: none (no streams)
                    self._send(conn, HELLO_ACK, 0, ack)
                    conn.max_reply = _U32.unpack_from(f.payload)[0]
                    try:
                        _set_timeout(conn.sock, socket.SO_RCVTIMEO, None)
                    except OSError:
                        return False
                    return not conn.closed
                try:
                    if not conn.reader.fill(f):
                        return False
                except OSError:
                    return False  # nothing in time (or the peer broke): closed without a frame
                # The handshake timeout bounds the whole hello, not each read of it.
                if time.monotonic() - conn.accepted > self._handshake_timeout:
                    return False

    def _reject(self, conn: _SConn, e: DecodeError) -> None:
        """Bytes that are not a frame: a connection error (id 0), then close."""
        self._send(conn, ERROR, 0, str(e).encode(), FLAG_SYSTEM, e.status)
        conn.close()

    def _serve_conn(self, conn: _SConn) -> None:
        while True:
            if not conn.read_lock.acquire(blocking=False):
                return  # another thread reads this connection now
            try:
                # After our SHUT_RD (shutdown) reading goes on: what the client sent before it is
                # still taken and answered, then the read ends at once.
                if conn.closed:
                    return
                conn.reader_active = True
                job = self._next_request(conn)
                conn.reader_active = False
                if job is None:
                    if not conn.read_shut:
                        conn.cancel_all()  # the peer left (or broke the protocol)
                    return
                conn.unattended_since = time.monotonic()
                buf = conn.reader.buf
                conn.pending_buffered = len(buf) >= FRAME_OVERHEAD and len(buf) >= 4 + _U32.unpack_from(buf)[0]
            finally:
                conn.read_lock.release()
            if self._sentinel_parked:
                self._sentinel_wake.set()
            self._run(conn, job)  # counted in `running` from admission to `_finish`

    def _next_request(self, conn: _SConn) -> Optional[_Job]:
        """Reads frames until a request to run (None: the connection is done)."""
        reader = conn.reader
        while True:
            try:
                f = reader.frame(self._max_payload) if reader.pending() else FRAME_OVERHEAD
            except DecodeError as e:
                self._reject(conn, e)
                return None
            if isinstance(f, int):
                partial = bool(reader.buf)
                if partial != conn.partial_timeout:
                    try:
                        _set_timeout(conn.sock, socket.SO_RCVTIMEO, self._frame_timeout if partial else None)
                    except OSError:
                        return None
                    conn.partial_timeout = partial
                if not partial:
                    conn.partial_since = None
                elif conn.partial_since is None:
                    conn.partial_since = time.monotonic()
                try:
                    more = reader.fill(f)
                except OSError as e:
                    if not _timed_out(e):
                        return None
                    more, late = True, True
                else:
                    late = conn.partial_since is not None and time.monotonic() - conn.partial_since > self._frame_timeout
                if not more:
                    return None
                if late:
                    # The frame timeout bounds the whole frame, so a trickling peer is cut off too.
                    msg = f"frame not completed within {_secs(self._frame_timeout)}"
                    self._send(conn, ERROR, 0, msg.encode(), FLAG_SYSTEM, TIMED_OUT)
                    conn.close()
                    return None
                continue
            kind, id = f.kind, f.id
            refusal = None
            if kind == REQUEST:
                if f.flags:
                    refusal = f"request has unknown flags {f.flags:#06x}"
                elif id == 0:
                    refusal = "request id 0 is reserved"
                elif self._stopping:
                    self._send(conn, ERROR, id, f"service '{self._name}' is shutting down".encode(), FLAG_SYSTEM | FLAG_NOT_RUN, BUSY)
                    continue
                else:
                    with conn.lock:
                        if id in conn.inflight:
                            refusal = f"request id {id} is already in flight"
                        else:
                            call = conn.inflight[id] = _Call()
                            conn.running += 1
                    if refusal is None:
                        deadline = time.monotonic() + f.deadline_ms / 1000 if f.deadline_ms else None
                        return f, call, deadline
            elif kind == CANCEL:
                c = conn.inflight.get(id)
                if c is not None:
                    c.cancelled = True
            elif kind == PING:
                self._send(conn, PONG, id, f.payload)
            elif kind == CREDIT:
                pass  # room for a stream: this server runs none, and ignores it as the Rust one does for an id not in flight
            elif kind in KIND_NAMES:
                if kind != PONG:
                    refusal = f"a client may not send {KIND_NAMES[kind]} frames here"
            else:
                refusal = f"unknown frame kind {kind}"
            if refusal is not None:
                self._send(conn, ERROR, id, refusal.encode(), FLAG_SYSTEM | FLAG_NOT_RUN, BAD_REQUEST)

    def _run(self, conn: _SConn, job: _Job) -> None:
        """Runs one request (§ 9.3 steps 5-8) and sends its one answer, unless none is wanted."""
        f, call, deadline = job
        method = f.method
        ep = self._default if not method else self._methods.get(method.decode("utf-8", "replace"))
        answer: Tuple[int, bytes, int, int]  # kind, payload, flags, status
        if ep is None or (method and method.startswith(b"$")):
            builtin = self._builtin(method)
            if builtin is not None:
                answer = (REPLY, builtin, 0, 0)
            else:
                try:
                    m = method.decode()
                    have = ", ".join(self._methods) or "only the default handler"
                    answer = (ERROR, f"service '{self._name}' has no method '{m}' (it has: {have})".encode(), FLAG_SYSTEM | FLAG_NOT_RUN, NO_METHOD)
                except UnicodeDecodeError:
                    answer = (ERROR, b"method name is not UTF-8", FLAG_SYSTEM | FLAG_NOT_RUN, BAD_REQUEST)
            return self._finish(conn, f.id, answer)
        started = time.monotonic()
        if deadline is not None and started >= deadline:
            answer = (ERROR, b"the deadline passed before the handler started", FLAG_SYSTEM | FLAG_NOT_RUN, TIMED_OUT)
            return self._finish(conn, f.id, answer)
        t0 = time.perf_counter_ns()
        flags, error = 0, None
        try:
            if ep.func is None:
                raise RemoteError(f"service '{self._name}' has no default handler; call one of its methods: {[*self._methods]}", NO_METHOD)
            payload: Union[bytes, str] = f.payload
            if ep.text:
                try:
                    payload = f.payload.decode()
                except UnicodeDecodeError as e:
                    raise RemoteError(f"payload is not UTF-8: {e}", BAD_REQUEST) from None
            _in_handler.server = self
            try:
                if ep.with_request:
                    req = Request(None if ep is self._default else ep.name, f.payload, conn.peer, f.id, deadline, call)
                    result = ep.func(payload, req)
                else:
                    result = ep.func(payload)
            finally:
                _in_handler.server = None
            reply = _reply_bytes(result)
            if len(reply) > conn.max_reply:
                flags, error = FLAG_SYSTEM, f"reply of {len(reply)} bytes is over the client's limit of {conn.max_reply} bytes"
                answer = (ERROR, error.encode(), flags, TOO_LARGE)
            else:
                answer = (REPLY, reply, 0, 0)
        except RemoteError as e:
            error = e.message
            answer = (ERROR, error.encode(), 0, e.code & 0xFFFF)
        except _BadReply as e:
            error = str(e)
            _log.error("the handler for %s returned an unusable reply: %s", self._label(ep), error)
            answer = (ERROR, error.encode(), 0, HANDLER_FAILED)
        except BaseException as e:  # SystemExit too: a handler does not end the server
            error = _describe(e)
            _log.error("the handler for %s raised %s", self._label(ep), error, exc_info=True)
            answer = (ERROR, error.encode(), 0, HANDLER_FAILED)
        ep.record(time.perf_counter_ns() - t0, error)
        if call.cancelled:
            answer = (0, b"", 0, 0)  # nobody reads an answer to a cancelled request
        elif deadline is not None and time.monotonic() >= deadline:
            answer = (ERROR, b"the deadline passed while the handler ran; its answer was discarded", FLAG_SYSTEM, TIMED_OUT)
        self._finish(conn, f.id, answer)

    def _label(self, ep: _Endpoint) -> str:
        return f"service '{self._name}'" if ep is self._default else f"method '{ep.name}' of service '{self._name}'"

    def _finish(self, conn: _SConn, id: int, answer: Tuple[int, bytes, int, int]) -> None:
        with conn.lock:
            conn.inflight.pop(id, None)
            conn.running -= 1
        kind, payload, flags, status = answer
        if kind:
            self._send(conn, kind, id, payload, flags, status)

    def _send(self, conn: _SConn, kind: int, id: int, payload: bytes, flags: int = 0, status: int = 0) -> None:
        """Writes one frame, fitted to the client's limit: an error's message is cut short (on a
        character boundary), any other answer over it becomes 413."""
        if conn.closed:
            return
        limit = conn.max_reply
        if len(payload) > limit and kind != HELLO_ACK:
            if kind == ERROR:
                cut = limit
                while cut > 0 and payload[cut] & 0xC0 == 0x80:
                    cut -= 1
                payload = payload[:cut]
            else:
                payload = f"answer of {len(payload)} bytes is over the client's limit of {limit} bytes".encode()
                kind, flags, status = ERROR, FLAG_SYSTEM, TOO_LARGE
        head = _HEADER.pack(HEADER_LEN + len(payload), VERSION, kind, flags, id, status, 0, 0)
        with conn.write_lock:
            try:
                _send(conn.sock, (head, payload))
            except _SendFailed as e:
                _log.debug("connection %d (pid %d): write failed: %s", conn.number, conn.peer[0], e.error)
                conn.cancel_all()
                conn.close()

    # -- the sentinel: a follower reader when a handler runs long (as the Rust blocking server)

    def _sentinel(self) -> None:
        """While a handler runs, nobody reads its connection. When that lasts a tick and the
        socket has bytes waiting (another request, a Cancel, the peer leaving), a follower
        thread takes over reading, so a slow handler never holds up the others and a Cancel
        reaches it."""
        idle = 0
        while not self._stopped.is_set() and self._state != "stopped":
            now = time.monotonic()
            with self._lock:
                conns = [*self._conns.values()]
            busy = False
            followers = []
            for c in conns:
                if c.running > 0:
                    busy = True
                    if (not c.reader_active and not c.closed and now - c.unattended_since >= _TICK
                            and c.running < self._max_in_flight):
                        followers.append(c)
            if followers:
                poller = select.poll()
                for c in followers:
                    try:
                        poller.register(c.sock, select.POLLIN | select.POLLRDHUP)
                    except (OSError, ValueError):
                        pass
                ready = {fd for fd, _ in poller.poll(0)}
                for c in followers:
                    try:
                        readable = c.sock.fileno() in ready
                    except OSError:
                        continue
                    if readable or c.pending_buffered:
                        self._start_follower(c)
            idle = 0 if busy else idle + 1
            if idle >= _IDLE_TICKS:
                self._sentinel_parked = True
                self._sentinel_wake.clear()
                if not any(c.running for c in conns) and not self._stopping:
                    self._sentinel_wake.wait(1.0)
                self._sentinel_parked = False
                idle = 0
            else:
                time.sleep(_TICK)

    def _start_follower(self, conn: _SConn) -> None:
        with self._lock:
            if conn.reader_active or conn.threads == 0:
                return
            conn.threads += 1
        conn.unattended_since = time.monotonic()  # so that the next tick does not start another
        try:
            threading.Thread(target=self._conn_thread, args=(conn, False), name="microcs-conn", daemon=True).start()
        except RuntimeError:
            self._leave(conn)

    # -- shutdown (§ 11)

    def _begin_stop(self) -> bool:
        """Refuses new requests and frees the name at once; True for the caller that then owns
        the rest of the shutdown (``_drain``)."""
        with self._state_lock:
            if self._state in ("stopping", "stopped"):
                return False
            self._was_running = self._state == "running"
            self._state = "stopping"
        self._stopping = True  # requests read from now on: 503 FLAG_NOT_RUN
        # The socket and lock go first: a new connect finds nothing (NoService) while the old
        # server drains, and none can land in a listener that no longer accepts.
        with self._lock:
            claim, self._claim = self._claim, None
        if claim is not None:
            claim.release()
        if self._was_running:
            os.write(self._wake_w, b"x")
        return True

    def _drain(self) -> None:
        """Lets running handlers finish within the grace period, then closes what is left."""
        if self._was_running:
            self._threads[0].join()
        self._listener.close()
        deadline = time.monotonic() + self._grace
        with self._lock:
            for c in self._conns.values():
                c.read_shut = True
                c.shut(socket.SHUT_RD)  # what was sent is still read; new frames fail with EPIPE
            while self._conns:
                left = deadline - time.monotonic()
                if left <= 0:
                    _log.warning("service '%s': grace period over; closing %d connections with handlers still running", self._name, len(self._conns))
                    for c in self._conns.values():
                        c.cancel_all()
                        c.close()
                    break
                self._drained.wait(left)
        self._state = "stopped"
        self._stopped.set()
        self._sentinel_wake.set()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
        _RUNNING.discard(self)

    def __del__(self) -> None:
        claim = getattr(self, "_claim", None)
        if claim is not None and getattr(self, "_state", "") == "bound":
            claim.release()


def _describe(e: BaseException) -> str:
    """``ExceptionType: message`` (with the module of a non-builtin type)."""
    t = type(e)
    name = t.__qualname__
    if t.__module__ not in ("builtins", "__main__"):
        name = f"{t.__module__}.{name}"
    text = str(e)
    return f"{name}: {text}" if text else name


_in_handler = threading.local()
#: Servers serving in this process, stopped (their names freed) when the interpreter exits.
_RUNNING: "weakref.WeakSet[Server]" = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for s in [*_RUNNING]:
        s.stop()


def _callable_module(module_name: str, func: Callable[..., Any]) -> None:
    """Makes ``import NAME; NAME(...)`` call ``func``: how the original course project used its
    ``micro_server`` and ``micro_client`` modules."""

    class CallableModule(types.ModuleType):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return func(*args, **kwargs)

    sys.modules[module_name].__class__ = CallableModule


#: ``microcs_lite.list()``, as the issue names it; ``list_services`` as the compiled package does.
list = list_services

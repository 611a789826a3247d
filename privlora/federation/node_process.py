"""The node process: one long-lived privlora process per client machine that owns the node.

    privlora node serve --node-config NODE.toml

It builds the node's `ClientNode` once from its node config (`privlora.federation.deploy`: the
federation's TOML, client id, data, ``node-dir``, signing key, noise source): its ledger, lifetime
ledger, key, data, tokenizer and model, before it listens (``--lazy``: the data and model on the
first message that trains), and keeps them for its whole life. Flower's ClientApp (a fresh process per message, shipped by the
server) only relays message bytes to it (`privlora.transports.flower.client_app`); a node's
secure-aggregation session and this round's pending contribution simply stay in this process's
memory (nothing is sealed or handed to the SuperNode between messages).

Where it listens: a Unix socket, ``NODE-DIR/node.sock`` by default (``node-socket`` in the node
config), created mode 0600 (the node's folder mode 0700 when the process creates it): only the
node's own OS user can connect. When the node process runs as its own OS user and the SuperNode
as another, put the socket outside the node folder (``node-socket =
"/run/privlora-node/node.sock"``) and name the group of the SuperNode's user (``socket-group``):
the socket is then mode 0660 in that group, and the node folder stays unreadable to the
SuperNode. Nothing listens on the network.

One node process per folder: it holds an exclusive ``fcntl.flock`` on ``NODE-DIR/node.lock`` for
its whole life; a second process on the same folder refuses to start (`NodeBusy`), naming the
pid holding it. The lock is the kernel's: a process killed by SIGKILL releases it.

One message at a time: the process accepts one connection, reads one request frame, answers it,
and only then accepts the next, so two messages pushed at once are served one after the other
(the budget check and the charge of one never interleave with another's).

Frames (`ask` is the client side): a request is one op byte (``M`` a privlora message, ``W``
"which client are you") and an 8-byte big-endian length, then the payload; a reply is one status
byte (``O`` the node's reply bytes, ``E`` the reason the node refused or failed, UTF-8) and a
length, then the payload. A frame larger than ``MAX_FRAME`` is refused before it is read, and
each read or write of a frame must complete within ``IO_TIMEOUT`` seconds (a peer that stalls
mid-frame is dropped; the node serves the next).

SIGTERM / SIGINT: the message in hand is finished (its charge, training, kept release and reply),
then the socket is removed, the lock released and the process exits 0. Its ledger is consistent at
every instant anyway: a charge is fsynced before training, a release is kept before it leaves, so
even SIGKILL leaves a charge spent and a restarted node re-sends the kept release where the rules
allow (`privlora.federation.node.ClientGuard`).

Every message is appended to ``NODE-DIR/activity.jsonl`` (time, kind, round, stage, received or
sent) and ``pause-at`` (fault injection for tests) pauses this process on that stage, or, with
``pause-at = "charged"``, right after a charge is on disk.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import struct
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from privlora.core.errors import UserError

SOCKET_NAME = "node.sock"
LOCK_NAME = "node.lock"
MAX_FRAME = 1 << 30
"""The largest frame either side reads (1 GiB); privlora's own messages are far smaller."""
IO_TIMEOUT = 60.0
"""Seconds a peer has to send (or take) one whole frame."""
OP_MESSAGE, OP_WHOAMI = b"M", b"W"
OK, ERROR = b"O", b"E"
PAUSE_CHARGED = "charged"
"""``pause-at`` value (tests only): the node process pauses right after a charge reaches its ledger."""
_HEAD = struct.Struct(">cQ")


class NodeBusy(UserError):
    """Another node process already serves this node folder."""


class NodeUnreachable(UserError):
    """The relay could not get an answer from the node process (none running, it died, or timed out)."""


class NodeError(UserError):
    """The node process answered with an error: it refused the message or failed on it."""


# ---------------------------------------------------------------------------------- addresses
@contextmanager
def _address(path: Path):
    """An AF_UNIX address for ``path``. Linux limits such addresses to 107 bytes; a longer path is
    reached through its folder, opened as /proc/self/fd/N (the folder's own inode, no race)."""
    path = Path(path)
    if len(os.fsencode(str(path))) < 100:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def socket_path(settings) -> Path:
    return Path(settings.node_socket) if getattr(settings, "node_socket", "") else Path(settings.node_dir) / SOCKET_NAME


def listening(path: str | Path) -> bool:
    """True if a node process accepts connections on ``path`` now (a stale socket file left by a
    killed process is not enough)."""
    path = Path(path)
    if not path.exists():
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s, _address(path) as addr:
            s.settimeout(2.0)
            s.connect(addr)
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------- frames
def _recv_exact(sock: socket.socket, n: int, deadline: float) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"a frame did not arrive within its time ({len(buf)} of {n} bytes)")
        sock.settimeout(left)
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise ConnectionError(f"the peer closed the connection after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def read_frame(sock: socket.socket, timeout: float, max_frame: int = MAX_FRAME) -> tuple[bytes, bytes]:
    """(op or status byte, payload); the whole frame within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    sock.settimeout(timeout)
    first = sock.recv(1)
    if not first:
        raise EOFError("the peer closed the connection before sending anything")
    tag, n = _HEAD.unpack(first + _recv_exact(sock, _HEAD.size - 1, deadline))
    if n > max_frame:
        raise ValueError(f"a frame of {n} bytes exceeds the {max_frame}-byte limit")
    return tag, _recv_exact(sock, n, deadline)


def write_frame(sock: socket.socket, tag: bytes, payload: bytes, timeout: float) -> None:
    sock.settimeout(timeout)
    sock.sendall(_HEAD.pack(tag, len(payload)) + payload)


def ask(path: str | Path, payload: bytes, timeout: float, op: bytes = OP_MESSAGE, connect_timeout: float = 5.0) -> bytes:
    """The node process's reply to one request: the client side of a frame exchange. Raises
    `NodeUnreachable` (no process, it died mid-message, or no answer within ``timeout`` seconds:
    the time waiting behind other messages included) or `NodeError` (the node refused or failed)."""
    path = Path(path)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s, _address(path) as addr:
            s.settimeout(connect_timeout)
            s.connect(addr)
            write_frame(s, op, payload, IO_TIMEOUT)
            status, body = read_frame(s, timeout)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise NodeUnreachable(f"no node process listens on {path} ({exc.strerror or exc}); start it with "
                              "`privlora node serve --node-config NODE.toml` on this machine") from None
    except TimeoutError:
        raise NodeUnreachable(f"the node process on {path} did not answer within {timeout:.0f} s") from None
    except (ConnectionError, EOFError, OSError, ValueError, struct.error) as exc:
        raise NodeUnreachable(f"the node process on {path} stopped before answering ({type(exc).__name__}: {exc})") from None
    if status == OK:
        return body
    if status == ERROR:
        raise NodeError(body.decode("utf-8", "replace"))
    raise NodeUnreachable(f"the node process on {path} answered with an unknown status {status!r}")


# ---------------------------------------------------------------------------------- the log
def log_activity(node_dir: Path, blob: bytes, direction: str | None = None) -> dict:
    """Append (time, kind, round, stage[, direction]) of a message this node received or sent."""
    from privlora.federation.messages import KINDS, Message

    msg = Message.from_bytes(blob, KINDS)
    entry = {"time": time.time(), "kind": msg.kind, "round": msg.header.get("round"), "stage": msg.header.get("stage")}
    if direction is not None:
        entry["direction"] = direction
        entry["pid"] = os.getpid()
    node_dir.mkdir(parents=True, exist_ok=True)
    with open(node_dir / "activity.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry) + "\n")
    return entry


def pause(node_dir: Path, stage: str) -> None:
    """Fault injection (`pause-at`): mark the spot and stop answering, so a test can kill the node."""
    (node_dir / f"paused-at-{stage}").write_text("paused\n", encoding="utf-8")
    time.sleep(600)
    raise RuntimeError(f"node paused at {stage} (pause-at) and was not killed")


# ---------------------------------------------------------------------------------- the server
class NodeProcess:
    """The node's long-lived server. ``with NodeProcess(settings) as p: p.serve()``; entering takes
    the folder's lock (or raises `NodeBusy`) and binds the socket; leaving removes both."""

    def __init__(self, settings, max_frame: int = MAX_FRAME, io_timeout: float = IO_TIMEOUT, preload: bool = True):
        self.settings = settings
        self.preload = bool(preload)
        self.node_dir = Path(settings.node_dir)
        self.path = socket_path(settings)
        self.max_frame, self.io_timeout = int(max_frame), float(io_timeout)
        self.node = None
        self.stopping: str | None = None
        self._lock_fd: int | None = None
        self._sock: socket.socket | None = None
        self.served = 0

    # ------------------------------------------------------------- lock and socket
    def _lock(self) -> None:
        import fcntl

        if not self.node_dir.is_dir():
            self.node_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.node_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise NodeBusy(f"another node process (pid {holder}) already serves node folder {self.node_dir} (it holds "
                           f"{self.node_dir / LOCK_NAME}); one node folder has one node process: stop that one first, "
                           "or give this one its own node-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _bind(self) -> None:
        if self.path.exists() or self.path.is_symlink():
            self.path.unlink()  # we hold the folder's lock: whatever socket is here is a dead process's
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket is created mode 0600: only this user connects
        try:
            with _address(self.path) as addr:
                sock.bind(addr)
        except BaseException:
            sock.close()
            raise
        finally:
            os.umask(old)
        group = getattr(self.settings, "socket_group", "")
        if group:  # the relay runs as another user (the SuperNode's), a member of this group
            import grp

            from privlora.core.config import ConfigError

            try:
                gid = grp.getgrnam(group).gr_gid
                os.chown(self.path, -1, gid)
            except (KeyError, PermissionError) as exc:
                sock.close()
                raise ConfigError(f"node config: socket-group {group!r}: cannot give the socket to that group ({exc}); create "
                                  "the group and make this node's user a member of it (see docs/flower.md)") from None
            os.chmod(self.path, 0o660)
        else:
            os.chmod(self.path, 0o600)
        sock.listen(16)
        sock.settimeout(0.5)  # wakes to see a stop request
        self._sock = sock

    def __enter__(self) -> "NodeProcess":
        from privlora.federation.deploy import build_client_node

        self._lock()
        try:
            self.node = build_client_node(self.settings)
            if self.settings.pause_at == PAUSE_CHARGED and self.node.guard is not None:
                self._pause_after_charge()
            if self.preload:  # data, tokenizer and model now: the socket appears when the node is warm
                self.node.client  # noqa: B018 - loads and keeps them
            self._bind()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _pause_after_charge(self) -> None:
        """Fault injection (``pause-at = "charged"``): pause right after a charge is on disk, before
        training, so that a test can kill the node between its charge and its release."""
        guard, charge = self.node.guard, self.node.guard.charge

        def charge_then_pause(rnd, mechanism):
            charge(rnd, mechanism)
            pause(self.node_dir, PAUSE_CHARGED)

        guard.charge = charge_then_pause

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    # ------------------------------------------------------------- serving
    def stop(self, signum=None, frame=None) -> None:
        """Finish the message in hand, then exit (a signal handler: it only sets a flag)."""
        self.stopping = signal.Signals(signum).name if signum else "stop"

    def answer(self, op: bytes, payload: bytes) -> tuple[bytes, bytes]:
        """(status, body) for one request; every failure is an ``E`` frame naming the reason."""
        node = self.node
        if op == OP_WHOAMI:
            return OK, json.dumps({"client-id": node.client_id}).encode()
        if op != OP_MESSAGE:
            return ERROR, f"unknown request op {op!r}".encode()
        s = self.settings
        try:
            seen = log_activity(self.node_dir, payload, "received")
            if s.pause_at and seen.get("stage") == s.pause_at:
                pause(self.node_dir, s.pause_at)
            reply = node.handle(payload)
            log_activity(self.node_dir, reply, "sent")
            return OK, reply
        except UserError as exc:  # the node's own refusal of a message (a bad one, a forbidden session)
            print(f"privlora: node {node.client_id}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            return ERROR, f"{type(exc).__name__}: {exc}".encode()
        except Exception as exc:  # noqa: BLE001 - a bug: logged in full here, the node keeps serving
            import traceback

            traceback.print_exc()
            return ERROR, f"the node process failed on this message: {type(exc).__name__}: {exc}".encode()

    def serve_one(self, conn: socket.socket) -> None:
        try:
            op, payload = read_frame(conn, self.io_timeout, self.max_frame)
        except EOFError:  # a connection that sends nothing (`listening` probes so)
            return
        except (TimeoutError, ConnectionError, OSError, ValueError, struct.error) as exc:
            print(f"privlora: node: dropped a request: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            return
        status, body = self.answer(op, payload)
        self.served += 1
        try:
            write_frame(conn, status, body, self.io_timeout)
        except OSError as exc:  # the relay went away; the node's records are already on disk
            print(f"privlora: node: the reply could not be sent ({exc}); the relay had gone", file=sys.stderr, flush=True)

    def serve(self, max_messages: int | None = None) -> None:
        while self.stopping is None and (max_messages is None or self.served < max_messages):
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except InterruptedError:  # pragma: no cover - PEP 475 retries; kept for clarity
                continue
            with conn:
                self.serve_one(conn)


def serve(settings, ready=None, preload: bool = True) -> int:
    """Run the node process until SIGTERM/SIGINT; 0 on a clean stop. ``preload``: load the data,
    tokenizer and model before listening (else on the first message that trains)."""
    p = NodeProcess(settings, preload=preload)
    previous = {s: signal.signal(s, p.stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        with p:
            print(f"privlora: node process {os.getpid()} serves client {p.node.client_id} of node folder {p.node_dir} "
                  f"on {p.path}", file=sys.stderr, flush=True)
            if ready is not None:
                ready(p)
            p.serve()
        print(f"privlora: node process {os.getpid()} stopped ({p.stopping}) after {p.served} messages; socket removed",
              file=sys.stderr, flush=True)
        return 0
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def read_node_config(value: str) -> dict:
    """A node config from a TOML file, or from Flower's ``--node-config`` form
    (``'config="fed.toml" client-id=0 node-dir="/srv/node"'``)."""
    import shlex
    import tomllib

    from privlora.core.config import ConfigError

    path = Path(value).expanduser()
    try:
        if path.is_file():
            return tomllib.loads(path.read_text(encoding="utf-8"))
        if "=" not in value:
            raise ConfigError(f"--node-config: {value!r} is neither an existing TOML file nor KEY=VALUE pairs")
        return tomllib.loads("\n".join(_pair(p) for p in shlex.split(value, posix=False)))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--node-config {value!r}: not valid TOML ({exc}); e.g. config=\"fed.toml\" client-id=0") from None


def _pair(p: str) -> str:
    k, _, v = p.partition("=")
    return f'"{k.strip()}" = {v.strip()}'


__all__ = ["NodeBusy", "NodeError", "NodeProcess", "NodeUnreachable", "ask", "log_activity", "listening", "read_node_config", "serve",
           "socket_path"]

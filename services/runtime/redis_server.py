"""`RedisServer`: a real redis-server child process (used by `kvstash up` and by tests).

Invariants:
- The server binds 127.0.0.1 only, RDB snapshots are off (`save ""`), AOF is on only if asked.
- `start()` returns only once the server answers PING; otherwise it raises RuntimeError with the reason
  and the tail of the server's log, and leaves no process behind.
- `restart()` reuses the same port and data dir (so AOF data survives a restart or a `kill()`).
- `stop()` is idempotent; it removes the data dir only when this object created it (a temp dir).
- A password, if any, is passed to the server on stdin, never on its command line.
"""

from __future__ import annotations

import atexit
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.parse
from pathlib import Path

import redis

LOG_NAME = "redis-server.log"


def _die_with_parent() -> None:  # runs in the child before exec (Linux): no orphaned redis-servers
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CLUSTER_BUS_OFFSET = 10000  # a cluster node also listens on port + 10000 (its bus), so its port is <= 55535
MAX_CLUSTER_PORT = 65535 - CLUSTER_BUS_OFFSET


def free_cluster_port(rng: random.Random | None = None) -> int:
    """A port free on 127.0.0.1 whose cluster bus port (+10000) is free too, both <= 65535.

    The kernel's ephemeral range (32768-60999) reaches above 55535, where redis-server refuses to
    start a cluster node, so the port is drawn from 20000-55535 and both sockets are test-bound."""
    rng = rng or random.SystemRandom()
    for _ in range(200):
        port = rng.randint(20000, MAX_CLUSTER_PORT)
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as a, \
                    socket.socket(socket.AF_INET, socket.SOCK_STREAM) as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + CLUSTER_BUS_OFFSET))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair (port, port+10000) on 127.0.0.1 for a cluster node")


def _quote(value: str) -> str:
    """A redis.conf double-quoted string (backslash escapes)."""
    if any(c in value for c in "\r\n\0"):
        raise ValueError("a redis password cannot contain newlines or NUL")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class RedisServer:
    def __init__(self, port: int | None = None, data_dir: str | None = None, appendonly: bool = False,
                 binary: str = "redis-server", password: str | None = None, cluster: bool = False,
                 cluster_node_timeout_ms: int = 15000):
        self.port = port
        self.cluster = cluster  # --cluster-enabled, its nodes file in data_dir
        self.cluster_node_timeout_ms = cluster_node_timeout_ms  # how long a silent master waits for its failover
        self.data_dir = data_dir
        self.appendonly = appendonly
        self.binary = binary
        self.password = password
        self.proc: subprocess.Popen | None = None
        self._own_dir = False
        self._log = None

    # ---- properties -----------------------------------------------------------------------------
    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("redis-server has not been started")
        auth = f":{urllib.parse.quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path | None:
        return Path(self.data_dir) / LOG_NAME if self.data_dir else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def client(self, **kwargs) -> redis.Redis:
        """A new client to this server (binary values unless told otherwise)."""
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, **kwargs)

    # ---- lifecycle ------------------------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> RedisServer:
        if self.running:
            return self
        binary = shutil.which(self.binary)
        if binary is None:
            raise RuntimeError(f"redis-server binary {self.binary!r} not found on PATH; install redis-server "
                               "(e.g. apt-get install redis-server) or set redis.url to an existing server")
        if self.data_dir is None:
            self.data_dir = tempfile.mkdtemp(prefix="kvstash-redis-")
            self._own_dir = True
        Path(self.data_dir).mkdir(parents=True, exist_ok=True)
        pick_port = self.port is None
        attempts = 3 if pick_port else 1
        for attempt in range(attempts):
            if pick_port:
                self.port = free_cluster_port() if self.cluster else free_port()
            try:
                self._spawn(binary, timeout)
                return self
            except RuntimeError:
                if attempt == attempts - 1:
                    if pick_port:
                        self.port = None
                    self._remove_own_dir()
                    raise
        return self  # unreachable

    def _spawn(self, binary: str, timeout: float) -> None:
        args = [binary, "-", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "yes" if self.appendonly else "no", "--dir", str(Path(self.data_dir).resolve()),
                "--daemonize", "no", "--logfile", ""]
        if self.cluster:
            args += ["--cluster-enabled", "yes", "--cluster-config-file",
                     str(Path(self.data_dir).resolve() / "nodes.conf"),
                     "--cluster-node-timeout", str(self.cluster_node_timeout_ms)]
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - held while the server runs; closed by stop()
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True, preexec_fn=_die_with_parent)
        config = f"requirepass {_quote(self.password)}\n" if self.password else ""
        try:
            self.proc.stdin.write(config.encode("utf-8"))
            self.proc.stdin.close()
        except OSError:
            pass  # the process died at once; reported below
        deadline = time.monotonic() + timeout
        last_error = "no answer"
        while True:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self._cleanup_proc()
                raise RuntimeError(f"redis-server exited with code {code} during startup on port {self.port}"
                                   f"{self._log_tail()}")
            try:
                with self.client(socket_timeout=0.5, socket_connect_timeout=0.5) as c:
                    # Our child, not another server that happens to hold the port.
                    if c.ping() and int(c.info("server")["process_id"]) == self.proc.pid:
                        atexit.register(self.stop)
                        return
                    last_error = "another process answers on this port"
            except (redis.RedisError, OSError) as e:
                last_error = f"{type(e).__name__}: {e}"
            if time.monotonic() > deadline:
                self._terminate()
                raise RuntimeError(f"redis-server on port {self.port} did not answer PING within {timeout}s "
                                   f"({last_error}){self._log_tail()}")
            time.sleep(0.05)

    def _log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except (OSError, AttributeError):
            return ""
        return "\n--- tail of the redis-server log ---\n" + "\n".join(text) if text else ""

    def _cleanup_proc(self) -> None:
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def _terminate(self, grace: float = 10.0) -> None:
        """SIGTERM (Redis shuts down cleanly, flushing the AOF), then SIGKILL after `grace` seconds."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._cleanup_proc()

    def stop(self) -> None:
        """Stop the server (idempotent); remove its data dir if this object created it."""
        self._terminate()
        atexit.unregister(self.stop)
        self._remove_own_dir()

    def _remove_own_dir(self) -> None:
        if self._own_dir and self.data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.data_dir = None
            self._own_dir = False

    def cleanup(self) -> None:
        """Alias of `stop()` (stop, and remove the data dir if this object created it)."""
        self.stop()

    def kill(self) -> None:
        """SIGKILL the server, as a crash would (for fault tests). The port and data dir are kept."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        self._cleanup_proc()

    def restart(self, timeout: float = 10.0) -> None:
        """Stop (if running) and start again on the same port with the same data dir."""
        if self.port is None:
            raise RuntimeError("redis-server was never started; nothing to restart")
        self._terminate()
        self.start(timeout)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

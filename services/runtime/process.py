"""`ServiceProcess`: `kvstash up` run as a child process (benchmarks and tests drive a real service).

It waits for the ready file `kvstash up --ready-file` writes once the gateway serves, and stops the whole
process group (Ray and a spawned redis-server included) on `stop`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


class ServiceProcess:
    """`python -m services.cli.main up` with a given config, as a child process."""

    def __init__(self, tmp: Path, env: dict[str, str]):
        self.tmp = Path(tmp)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.ready_file = self.tmp / "ready.json"
        self.log_path = self.tmp / "kvstash-up.log"
        self.env = {**os.environ, "KVSTASH_GATEWAY__PORT": "0", "KVSTASH_GATEWAY__METRICS_PORT": "0",
                    "KVSTASH_HTTP__PORT": "0",
                    "KVSTASH_RAY__LOCAL_NUM_CPUS": "2", "RAY_DISABLE_USAGE_STATS": "1", **env}
        self.proc: subprocess.Popen | None = None
        self.info: dict = {}

    def start(self, timeout: float = 240.0) -> ServiceProcess:
        self.ready_file.unlink(missing_ok=True)
        with open(self.log_path, "ab") as log:  # the child holds its own descriptor
            self.proc = subprocess.Popen([sys.executable, "-m", "services.cli.main", "up", "--ready-file",
                                          str(self.ready_file)], cwd=REPO, env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self.ready_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"kvstash up did not become ready:\n{self.log_tail()}")
            time.sleep(0.2)
        self.info = json.loads(self.ready_file.read_text())
        return self

    @property
    def target(self) -> str:
        return self.info["grpc"]

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.info['http_port']}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.info['metrics_port']}/metrics"

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return ""

    def stop(self, drain: bool = False) -> None:
        """Stop the service and everything it started. `drain`: SIGTERM the main process alone first, so it
        can offload its workers' sessions before its local Ray goes down (what an operator's Ctrl-C of a
        foreground `kvstash up` does not allow)."""
        if self.proc and self.proc.poll() is None:
            if drain:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    pass
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

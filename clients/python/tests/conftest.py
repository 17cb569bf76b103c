"""Real processes for the tests: `redis-server` shards and the `mediacache` binary, on free
loopback ports. `MEDIACACHE_BIN` names the binary (default: the workspace's debug build)."""

from __future__ import annotations

import os
import pathlib
import signal
import socket
import subprocess
import time
from typing import Callable, Optional

import pytest

from mediacache_client import Client, MediaCacheError

ROOT = pathlib.Path(__file__).resolve().parents[3]
BIN = os.environ.get("MEDIACACHE_BIN") or str(ROOT / "target" / "debug" / "mediacache")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def eventually(what: str, check: Callable[[], object], timeout: float = 10.0):
    """Polls `check` until it returns something truthy; fails naming `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


class Redis:
    def __init__(self, workdir: pathlib.Path):
        self.port = free_port()
        self.workdir = workdir
        self.proc: Optional[subprocess.Popen] = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def answers():
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    return s.recv(16).startswith(b"+PONG")
            except OSError:
                return False

        eventually(f"redis-server on port {self.port}", answers)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"


class Service:
    """One `mediacache serve` process (`start()` runs it) with a config of its listen address,
    its shards and the `extra` YAML."""

    def __init__(self, workdir: pathlib.Path, shards: list, extra: str = ""):
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.workdir = workdir
        lines = [f"listen: {self.address}", "memory:", "  max_bytes: 0", "  max_object_bytes: 0"]
        if shards:
            lines.append("shards:")
            for i, shard in enumerate(shards):
                lines += [f"  - name: shard-{i}", f"    url: {shard.url}"]
        self.config = workdir / f"config-{self.port}.yaml"
        self.config.write_text("\n".join(lines) + "\n" + extra)
        self.log = workdir / f"service-{self.port}.log"
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [BIN, "serve", "--config", str(self.config)], stdout=log, stderr=log
            )
        self.wait_serving()

    def wait_serving(self) -> None:
        if "tls:" in self.config.read_text():
            # A TLS port answers no plain-text probe: accepting connections is the sign.
            def accepts():
                if self.proc.poll() is not None:
                    pytest.fail(f"mediacache exited: {self.log.read_text()[-2000:]}")
                try:
                    socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                    return True
                except OSError:
                    return False

            eventually(f"mediacache on {self.address}", accepts, timeout=30)
            return
        probe = Client(self.address, timeout=1.0)

        def serving():
            if self.proc.poll() is not None:
                pytest.fail(f"mediacache exited: {self.log.read_text()[-2000:]}")
            try:
                probe.stat(("probe.example", "probe"))
                return True
            except MediaCacheError as e:
                # A server that wants a token or a certificate answers, and so is up.
                return e.code.name in ("UNAUTHENTICATED", "PERMISSION_DENIED")

        try:
            eventually(f"mediacache on {self.address}", serving, timeout=30)
        finally:
            probe.close()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


@pytest.fixture
def cluster(tmp_path):
    """Two Redis shards and one service in front of them (memory tier off)."""
    made: list = []

    def start(shards: int = 2, extra: str = "") -> Service:
        redis = [Redis(tmp_path) for _ in range(shards)]
        made.extend(redis)
        service = Service(tmp_path, redis, extra)
        service.shards = redis
        made.append(service)  # stopped at the end even if it never comes up
        service.start()
        return service

    yield start
    for proc in reversed(made):
        if isinstance(proc, Service):
            proc.stop()
        else:
            proc.kill()


@pytest.fixture
def service(cluster) -> Service:
    return cluster()


@pytest.fixture
def client(service):
    with Client(service.address) as c:
        yield c

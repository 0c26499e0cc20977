"""Real components for the fleet tests: redis-server and nginx from Debian, and streamsvc
service processes, each on a free loopback port."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.02)
    raise AssertionError(f"nothing listens on {port} after {timeout_s} s")


def require(program: str) -> str:
    path = shutil.which(program) or shutil.which(program, path="/usr/sbin:/usr/bin")
    if path is None:
        pytest.fail(f"{program} is not installed (.ci/run installs it: apt-get install -y "
                    f"{'redis-server' if program == 'redis-server' else program})")
    return path


class RedisServer:
    """A real redis-server on a free loopback port; :meth:`stop` and :meth:`start` again on
    the same port for outages."""

    def __init__(self, directory: Path) -> None:
        self.program = require("redis-server")
        self.directory = directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.program, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port)

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None


class Service:
    """``python -m streamsvc serve`` in its own process, its JSON log lines collected."""

    def __init__(self, directory: Path, name: str, *, port: int, config: str,
                 env: dict[str, str]) -> None:
        self.name = name
        self.port = port
        config_path = directory / f"{name}.toml"
        config_path.write_text(config)
        self.lines: list[dict[str, Any]] = []
        self.process = subprocess.Popen(
            [sys.executable, "-m", "streamsvc", "serve", "--config", str(config_path),
             "--host", "127.0.0.1", "--port", str(port)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            env={**os.environ, "STREAMSVC_LOG_FORMAT": "json",
                 "STREAMSVC_INSTANCE_ID": name, **env})
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.wait_for("server.listening")

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with contextlib.suppress(ValueError):
                self.lines.append(json.loads(line))

    def events(self, name: str) -> list[dict[str, Any]]:
        return [line for line in list(self.lines) if line.get("event") == name]

    def wait_for(self, name: str, predicate: Callable[[dict[str, Any]], bool] = lambda _: True,
                 timeout_s: float = 15.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in self.events(name):
                if predicate(line):
                    return line
            if self.process.poll() is not None and not self.reader.is_alive():
                break
            time.sleep(0.02)
        raise AssertionError(f"{self.name}: no {name} line within {timeout_s} s; "
                             f"saw {[line.get('event') for line in self.lines][-20:]}")

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
            return str(r.read().decode())

    def terminate(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def stop(self) -> int:
        self.terminate()
        try:
            code = self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self.reader.join(timeout=5)
        if self.process.stdout is not None:
            self.process.stdout.close()
        return code


def metric(text: str, name: str) -> float:
    """The value of one sample line (``name`` with its labels, as exposed)."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0




def documented_location() -> str:
    """The ``location / { ... }`` block of docs/going-live.md's nginx snippet: the fleet
    tests put the documented proxy in front of their instances."""
    page = (Path(__file__).parent.parent / "docs" / "going-live.md").read_text(
        encoding="utf-8")
    snippet = page.split("```nginx\n", 1)[1].split("```", 1)[0]
    start = snippet.index("    location / {")
    end = snippet.index("\n    }\n", start) + len("\n    }")
    return snippet[start:end]

class Nginx:
    """nginx as the fleet's load balancer: WebSocket upgrades passed through, a request an
    instance refuses with 503 (draining) or cannot take retried on the next."""

    def __init__(self, directory: Path, upstream_ports: list[int], *,
                 port: int | None = None) -> None:
        program = require("nginx")
        self.port = port or free_port()
        root = directory / "nginx"
        for sub in ("", "body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        servers = "\n".join(f"    server 127.0.0.1:{port} max_fails=1 fail_timeout=30s;"
                            for port in upstream_ports)
        user = "user root;\n" if os.geteuid() == 0 else ""
        (root / "nginx.conf").write_text(f"""{user}worker_processes 1;
daemon off;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {root}/body;
  proxy_temp_path {root}/proxy;
  fastcgi_temp_path {root}/fastcgi;
  uwsgi_temp_path {root}/uwsgi;
  scgi_temp_path {root}/scgi;
  map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
  upstream streamsvc {{
{servers}
  }}
  server {{
    listen 127.0.0.1:{self.port};
{documented_location()}
  }}
}}
""")
        self.process = subprocess.Popen([program, "-p", str(root), "-c", str(root / "nginx.conf")],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()


@contextlib.contextmanager
def running(*services: Service) -> Iterator[None]:
    try:
        yield
    finally:
        for service in services:
            service.stop()

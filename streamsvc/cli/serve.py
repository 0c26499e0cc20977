"""``streamsvc serve``: run the stream server (one process, or ``--workers N`` sharing the
port), configured by defaults < TOML < environment < flags; SIGTERM drains it."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib
import importlib.util
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from streamsvc.config import SETTINGS, Settings, load_settings
from streamsvc.exceptions import ConfigError
from streamsvc.logs import capture_prints, configure_logging, flush_logging
from streamsvc.server import StreamServer
from streamsvc.server.gc_policy import GcPolicy, interval_for

__all__ = ["add_parser", "run"]

# Set by `serve --workers N` for its workers: the directory where they share metrics.
SHARED_METRICS_ENV = "STREAMSVC_SHARED_METRICS_DIR"
# How `serve --workers N` watches its workers: how often, how many deaths it replaces in
# all, and the longest pause before a replacement.
WORKER_POLL_S = 0.5
WORKER_RESTARTS = 10
WORKER_RESTART_MAX_S = 30.0


def add_parser(commands: Any) -> None:
    serve = commands.add_parser(
        "serve", help="run the stream server",
        description="Run the stream server. SIGTERM or SIGINT drains it (no new calls, those "
        "in progress go on for up to --drain-timeout-s), a second one stops it at once. "
        "Settings come from defaults < TOML file < environment < these flags.",
    )
    serve.add_argument("--config", metavar="FILE",
                       help="TOML file with [server], [[routes]], [handlers.NAME] "
                       "(env STREAMSVC_CONFIG); handlers named 'module:Factory' are "
                       "imported from the current directory too")
    for setting in SETTINGS:
        help_text = f"{setting.help} (env {' or '.join(setting.env)}"
        if setting.secret:
            help_text += "; prefer the environment: flags show in process lists)"
        else:
            help_text += f"; default {setting.default})"
        if setting.type is bool:
            serve.add_argument(setting.flag, dest=setting.key, action="store_true",
                               default=None, help=help_text)
        else:
            serve.add_argument(setting.flag, dest=setting.key, choices=setting.choices or None,
                               metavar=setting.key.split("_")[-1].upper(), help=help_text)



def run(args: argparse.Namespace, parser: argparse.ArgumentParser, argv: list[str]) -> int:
    try:
        settings = load_settings(
            config_path=args.config, cli={s.key: getattr(args, s.key) for s in SETTINGS}
        )
        loop_factory = _loop_factory(settings.event_loop)
        if SHARED_METRICS_ENV in os.environ and settings.workers == 1:
            settings = dataclasses.replace(settings,
                                           shared_metrics_dir=os.environ[SHARED_METRICS_ENV])
        if settings.transport == "picows" and importlib.util.find_spec("picows") is None:
            raise ConfigError("transport", "picows is not installed "
                              "(pip install 'streamsvc[fast]')")
    except ConfigError as exc:
        print(f"streamsvc: configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(log_format=settings.log_format, level=settings.log_level)
    capture_prints()  # a handler's print() becomes a log line, never half of one
    if settings.workers > 1:
        return _run_workers(settings.workers, argv)
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(_run_server(settings))
    except OSError as exc:  # e.g. address in use
        structlog.get_logger("streamsvc").error("server.failed", error=str(exc))
        return 1
    finally:
        flush_logging()
    return 0


def _loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop when asked for or (``auto``) installed; None for asyncio's own."""
    if choice == "asyncio":
        return None
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        if choice == "uvloop":
            raise ConfigError("event_loop", "uvloop is not installed "
                              "(pip install 'streamsvc[fast]')") from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def _run_workers(workers: int, argv: list[str]) -> int:
    """Run ``workers`` copies of this server sharing the port through SO_REUSEPORT (the
    kernel spreads connections over them); forward SIGTERM and SIGINT. A worker that dies
    while the service runs is replaced, after a pause that doubles on each death (1 s to
    30 s); its metrics leave the sums at once. Exits 0 when every worker ended cleanly on a
    signal, else 1 (a worker died and could not be replaced, or ended badly)."""
    command = [sys.executable, "-m", "streamsvc", *argv, "--workers", "1", "--reuse-port"]
    share = tempfile.TemporaryDirectory(prefix="streamsvc-metrics-")
    env = {**os.environ, SHARED_METRICS_ENV: share.name}
    logger = structlog.get_logger("streamsvc")
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    children = [subprocess.Popen(command, env=env) for _ in range(workers)]
    logger.info("server.workers", pids=[child.pid for child in children])
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, forward)
    failed = False
    deaths = 0
    with share:
        while not stopping and any(child.poll() is None for child in children):
            for index, child in enumerate(children):
                code = child.poll()
                if code is None or stopping:
                    continue
                Path(share.name, f"{child.pid}.json").unlink(missing_ok=True)
                deaths += 1
                pause = min(WORKER_RESTART_MAX_S, 2 ** (deaths - 1))
                logger.error("server.worker_died", pid=child.pid, exit_code=code,
                             restart_in_s=pause)
                if deaths > WORKER_RESTARTS:
                    failed = True
                    logger.error("server.worker_not_replaced", deaths=deaths)
                    forward(signal.SIGTERM, None)
                    break
                time.sleep(pause)
                if not stopping:
                    children[index] = subprocess.Popen(command, env=env)
                    logger.info("server.worker_restarted", pid=children[index].pid)
            time.sleep(WORKER_POLL_S)
        codes = [child.wait() for child in children]
    return 1 if failed or any(code != 0 for code in codes) else 0


async def _run_server(settings: Settings) -> None:
    """Serve until SIGTERM or SIGINT, then drain: calls in progress go on for up to
    ``drain_timeout_s``; a second signal ends them at once."""
    drain, abort = asyncio.Event(), asyncio.Event()

    def on_signal() -> None:
        (abort if drain.is_set() else drain).set()

    restore = on_signals(asyncio.get_running_loop(), on_signal)
    server = StreamServer(settings)
    collector = GcPolicy(interval_for(settings), lambda: server.active_calls,
                         lambda: server.calls_begun)
    collecting: asyncio.Task[None] | None = None
    try:
        collector.apply()  # before the loop-lag probe starts: its collection is start-up's
        await server.start()
        collecting = asyncio.get_running_loop().create_task(collector.run())
        try:
            await drain.wait()
        finally:
            await server.drain(settings.drain_timeout_s, abort=abort)
    finally:
        if collecting is not None:
            collecting.cancel()
        collector.restore()
        restore()


def on_signals(loop: asyncio.AbstractEventLoop, callback: Callable[[], None],
               signums: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)
               ) -> Callable[[], None]:
    """Call ``callback`` on the loop at each of ``signums``; returns what puts the previous
    handlers back. Not ``loop.add_signal_handler``: asyncio's loop learns of those through
    its self-pipe, and when a loop that is behind lets that pipe fill, CPython drops the
    signal ("Exception ignored when trying to write to the signal wakeup fd") and a SIGTERM
    never drains the server. A handler of the interpreter's own runs between bytecodes and
    queues the callback whether or not the pipe has room."""
    previous = {signum: signal.getsignal(signum) for signum in signums}

    def handler(signum: int, frame: object) -> None:
        loop.call_soon_threadsafe(callback)

    for signum in signums:
        signal.signal(signum, handler)

    def restore() -> None:
        for signum, was in previous.items():
            signal.signal(signum, was)

    return restore

"""Logging: never blocks the loop or kills a call, carries the standard library's lines
with the call's ids, and never writes a traceback's local variables or colour codes into
files."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import structlog

from streamsvc.config import Route, Settings
from streamsvc.logs import MAX_PRINTED_CHARS, LogSink, PrintedLines, configure_logging
from streamsvc.server import StreamServer

from .conftest import LogEvents, events


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """configure_logging is process-wide: put structlog and the root logger back after."""
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    structlog.configure(**saved)
    root.handlers[:], root.level = handlers, level


class Collected(io.BytesIO):
    """A stream that keeps what the sink wrote."""

    def lines(self, sink: LogSink) -> list[dict[str, Any]]:
        sink.flush()
        return [orjson.loads(line) for line in self.getvalue().splitlines()]


def test_a_sink_whose_reader_stalls_drops_and_counts_and_never_blocks() -> None:
    read_end, write_end = os.pipe()
    stream = os.fdopen(write_end, "wb")
    sink = LogSink(stream, max_lines=100)
    putter = threading.Thread(target=lambda: [sink.put(b"x" * 200 + b"\n")
                                              for _ in range(20_000)])
    putter.start()
    putter.join(timeout=30)
    assert not putter.is_alive()  # put never waited for the reader
    assert sink.dropped > 0
    read: list[bytes] = []
    reader = threading.Thread(target=lambda: read.append(os.read(read_end, 1 << 30) + b"".join(
        iter(lambda: os.read(read_end, 1 << 20), b""))))
    reader.start()  # the reader is back
    sink.flush(timeout_s=10)
    sink.put(b'{"event":"after"}\n')
    sink.flush(timeout_s=10)
    stream.close()
    reader.join(timeout=10)
    os.close(read_end)
    lines = b"".join(read).splitlines()
    assert b'{"event":"after"}' in lines
    reports = [orjson.loads(line) for line in lines if b"log.dropped" in line]
    assert sink.dropped == sum(report["dropped"] for report in reports)


def test_a_sink_on_a_full_disk_counts_write_errors_and_goes_on() -> None:
    with open("/dev/full", "wb", buffering=0) as full:
        sink = LogSink(full)
        for _ in range(5):
            sink.put(b"line\n")
        sink.flush()
    assert sink.write_errors >= 5
    assert sink.dropped >= 5


def test_after_losses_a_log_dropped_line_says_how_many() -> None:
    stream = Collected()
    sink = LogSink(stream, max_lines=1)
    stall = threading.Lock()
    stall.acquire()
    original = stream.write
    stream.write = lambda data: (stall.acquire(), stall.release(), original(data))[2]  # type: ignore[method-assign]
    for _ in range(50):
        sink.put(b'{"event":"x"}\n')
    stall.release()
    lost = sink.dropped
    assert lost > 0
    reports = [line for line in stream.lines(sink) if line["event"] == "log.dropped"]
    assert lost == sum(report["dropped"] for report in reports)


def test_standard_library_lines_are_json_with_the_calls_ids_and_the_level_honoured(
        restore_logging: None) -> None:
    stream = Collected()
    sink = configure_logging(level="info", stream=stream)
    with structlog.contextvars.bound_contextvars(call_sid="CA1", stream_sid="MZ1"):
        logging.getLogger("myapp.sdk").info("connected to %s", "stt")
        logging.getLogger("myapp.sdk").debug("not at info")
    [line] = stream.lines(sink)
    assert ("connected to stt", "info", "CA1", "MZ1", "myapp.sdk") == (
        line["event"], line["level"], line["call_sid"], line["stream_sid"], line["logger"])


def _fail_with_a_secret() -> None:
    api_key = "sk-live-do-not-log"  # noqa: F841 (a local the traceback must not show)
    raise RuntimeError("boom")


@pytest.mark.parametrize("log_format", ["json", "console"])
def test_tracebacks_carry_no_local_variables(restore_logging: None, log_format: str) -> None:
    stream = Collected()
    sink = configure_logging(log_format=log_format, stream=stream)
    try:
        _fail_with_a_secret()
    except RuntimeError:
        structlog.get_logger().exception("handler.failed")
        logging.getLogger("myapp").exception("sdk failed")
    sink.flush()
    text = stream.getvalue().decode()
    assert "boom" in text
    assert "sk-live-do-not-log" not in text


def test_console_logs_to_a_file_carry_no_colour_codes(restore_logging: None) -> None:
    stream = Collected()
    sink = configure_logging(log_format="console", stream=stream)
    structlog.get_logger().warning("stream.idle_timeout", timeout_s=15.0)
    sink.flush()
    text = stream.getvalue().decode()
    assert "stream.idle_timeout" in text
    assert "\x1b[" not in text


def test_no_color_turns_colours_off_even_on_a_terminal(restore_logging: None) -> None:
    script = ("import os, pty, sys\n"
              "from streamsvc.logs import configure_logging\n"
              "import structlog\n"
              "main, child = pty.openpty()\n"
              "sink = configure_logging(log_format='console', stream=os.fdopen(child, 'wb'))\n"
              "structlog.get_logger().warning('coloured?')\n"
              "sink.flush()\n"
              "sys.stdout.write(repr(os.read(main, 4096)))\n")
    plain = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           env={**os.environ, "NO_COLOR": "1"}, timeout=30, check=True)
    coloured = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              env={k: v for k, v in os.environ.items() if k != "NO_COLOR"},
                              timeout=30, check=True)
    assert "\\x1b[" not in plain.stdout
    assert "\\x1b[" in coloured.stdout


async def test_server_stopped_says_where_it_listened(logs: LogEvents) -> None:
    server = StreamServer(Settings(port=0, routes=(Route("/media", ()),)))
    await server.start()
    await server.stop()
    (listening,) = events(logs, "server.listening")
    (stopped,) = events(logs, "server.stopped")
    assert ("127.0.0.1", server.port, ["/media"]) == (stopped["host"], stopped["port"],
                                                       stopped["routes"])
    assert (listening["host"], listening["port"]) == (stopped["host"], stopped["port"])


def test_the_console_script_imports_handlers_from_the_current_directory(
        tmp_path: Path) -> None:
    (tmp_path / "myapp.py").write_text("from streamsvc import Handler\n"
                                       "class Handler2(Handler):\n    pass\n")
    (tmp_path / "app.toml").write_text('[[routes]]\npath = "/stream"\n'
                                       'handlers = ["myapp:Handler2"]\n')
    script = Path(sys.executable).parent / "streamsvc"
    process = subprocess.Popen([str(script), "serve", "--config", "app.toml", "--port", "0"],
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env={**os.environ, "PYTHONPATH": ""})
    try:
        assert process.stdout is not None
        first = orjson.loads(process.stdout.readline() or b"{}")
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=30)
    assert "server.listening" == first.get("event"), stderr.decode()
    time.sleep(0)


def test_what_a_handler_prints_becomes_log_lines_never_half_of_one(logs: LogEvents) -> None:
    printed = PrintedLines()
    print("hello from a handler\nand a second line", file=printed, end="")
    print(" continued", file=printed)
    print("x" * (MAX_PRINTED_CHARS + 10), file=printed, end="")
    printed.flush()
    assert ["hello from a handler", "and a second line continued",
            "x" * MAX_PRINTED_CHARS] == [  # a line is cut at MAX_PRINTED_CHARS
        line["text"] for line in events(logs, "stdout.print")]


def test_the_served_process_keeps_stdout_json_when_a_handler_prints(tmp_path: Path) -> None:
    (tmp_path / "noisy.py").write_text(
        "from streamsvc import Handler\n"
        "class Noisy(Handler):\n"
        "    def on_start(self, session):\n"
        "        print('a handler printing', 42)\n", encoding="utf-8")
    (tmp_path / "config.toml").write_text(
        '[[routes]]\npath = "/stream"\nhandlers = ["noisy:Noisy"]\n', encoding="utf-8")
    script = (
        "import asyncio, sys\n"
        "from streamsvc.cli import main\n"
        "sys.exit(main(['serve', '--config', 'config.toml', '--port', '0']))\n")
    process = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert process.stdout is not None
    port = None
    for line in process.stdout:
        event = orjson.loads(line)
        if event["event"] == "server.listening":
            port = event["port"]
            break
    assert port is not None
    replayed = subprocess.run(
        [sys.executable, "-m", "streamsvc", "replay", "--speed", "0",
         str(Path(__file__).parent.parent / "fixtures" / "inbound_params.jsonl"),
         "--url", f"ws://127.0.0.1:{port}/stream"], capture_output=True, timeout=60)
    assert 0 == replayed.returncode, replayed.stderr
    process.terminate()
    rest, _ = process.communicate(timeout=30)
    lines = [orjson.loads(line) for line in rest.splitlines()]  # every line is JSON
    assert ["a handler printing 42"] == [line["text"] for line in lines
                                         if line["event"] == "stdout.print"]


def test_replay_into_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    """As `streamsvc replay ... | head` when head is gone before the summary is written."""
    fixture = Path(__file__).parent.parent / "fixtures" / "inbound_params.jsonl"
    process = subprocess.Popen(
        [sys.executable, "-m", "streamsvc", "replay", str(fixture), "--url",
         "ws://127.0.0.1:9/stream"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None
    assert process.stderr is not None
    process.stdout.close()  # the reader is gone before anything is written
    with process.stderr:
        errors = process.stderr.read()
    process.wait(timeout=60)
    assert b"" == errors

"""``--endpoint`` against servers that misbehave on purpose (issue 27), and answers that hold terminal control
sequences: a small HTTP server on a loopback port that answers as it is told, driven through the CLI.

Each failure must be one line with exit 3 (never a traceback, a hang or exit 0), the user's OpenAI
credentials must never leave, and an answer reaches a terminal with its control characters escaped but
a pipe or --json byte for byte.
"""

from __future__ import annotations

import io
import json
import os
import pty
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from typer.testing import CliRunner

from longdoc.cli import app
from longdoc.render import Reporter
from longdoc.runtime import remote
from longdoc.sanitize import terminal_safe

from .helpers import REPO

NOTES = str(REPO / "sample_docs" / "notes.md")
# What a hostile document can steer a model into copying: set the window title, turn the text red,
# shift out/in of a character set, and a carriage return that overwrites the line.
HOSTILE = "\x1b]0;TITLE\x07\x1b[31mred\x0f\x14\r over\n\tnext \x9b2J"
runner = CliRunner()


class Broken(BaseHTTPRequestHandler):
    """Answers /models and /chat/completions as ``server.behaviour`` says; records the request heads."""

    protocol_version = "HTTP/1.1"
    server: Any

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self.server.heads.append({name.lower(): value for name, value in self.headers.items()})
        kind = self.server.behaviour.get("models", "ok")
        if kind == "silent":
            self.server.release.wait(60)
            return
        if kind == "html":
            self.send(200, b"<html><body><h1>Welcome to nginx!</h1></body></html>", "text/html")
            return
        name = self.server.behaviour.get("name", "tiny")
        card = {"id": name, "object": "model", "created": 0, "owned_by": "x", "max_model_len": 100_000}
        self.send(200, json.dumps({"object": "list", "data": [card]}).encode(), "application/json")

    def do_POST(self) -> None:
        self.server.heads.append({name.lower(): value for name, value in self.headers.items()})
        self.rfile.read(int(self.headers.get("content-length", 0)))
        kind = self.server.behaviour.get("chat", "ok")
        if kind == "silent":
            self.server.release.wait(60)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        text = self.server.behaviour.get("text", "An answer.")
        self.event({"content": text}, None)
        if kind == "reset":  # the connection drops mid-answer (closed with a reset once the handler returns)
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            self.close_connection = True
            return
        if kind == "ok":
            self.event({}, "stop")
            self.chunk(b"data: [DONE]\n\n")
        self.chunk(b"")  # the end of the body: cleanly, but for "unfinished" without finish_reason or [DONE]

    def send(self, status: int, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def event(self, delta: dict[str, Any], reason: str | None) -> None:
        choice = {"index": 0, "delta": delta, "finish_reason": reason}
        obj = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "tiny", "choices": [choice]}
        self.chunk(f"data: {json.dumps(obj)}\n\n".encode())

    def chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()


@pytest.fixture
def broken() -> Iterator[Any]:
    server: Any = ThreadingHTTPServer(("127.0.0.1", 0), Broken)
    server.daemon_threads = True
    server.behaviour, server.heads, server.release = {}, [], threading.Event()
    server.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.release.set()
    server.shutdown()
    server.server_close()


def ask(tiny_chat: str, server: Any, *extra: str) -> Any:
    # a --timeout that ends a test that would otherwise hang (a later one takes precedence)
    args = ["ask", NOTES, "Which port?", "--model", tiny_chat, "--endpoint", server.url, "--timeout", "20", *extra]
    return runner.invoke(app, args)


def one_line_error(result: Any, code: int = 3) -> str:
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert [line for line in lines if line.startswith("error: ")] == lines[-1:], result.stderr
    return str(lines[-1])


# --------------------------------------------------------------------------------------------------
# 7. the client against broken servers


def test_an_answer_cut_off_without_finish_reason_is_an_error(tiny_chat, broken):
    broken.behaviour.update(chat="unfinished")
    line = one_line_error(ask(tiny_chat, broken, "--json"))
    assert "ended the answer before it was complete" in line
    assert ask(tiny_chat, broken).exit_code == 3  # streamed to stdout as well: not taken for a whole answer
    broken.behaviour.update(chat="ok")
    assert json.loads(ask(tiny_chat, broken, "--json").stdout)["answer"] == "An answer."


def test_html_where_the_api_should_be_is_one_line(tiny_chat, broken):
    broken.behaviour.update(models="html")
    line = one_line_error(ask(tiny_chat, broken))
    assert "answered GET /models with text/html, not an OpenAI model list" in line


def test_a_silent_server_is_given_up_on(tiny_chat, broken, monkeypatch):
    monkeypatch.setattr(remote, "MODELS_TIMEOUT_S", 1.0)
    broken.behaviour.update(models="silent")
    t0 = time.monotonic()
    line = one_line_error(ask(tiny_chat, broken))
    assert "sent nothing for 1s during GET /models" in line and time.monotonic() - t0 < 20
    broken.behaviour.update(models="ok", chat="silent")
    t0 = time.monotonic()
    line = one_line_error(ask(tiny_chat, broken, "--timeout", "1"))
    assert "sent nothing for 1s during POST /chat/completions" in line and "--timeout" in line
    assert time.monotonic() - t0 < 20


def test_a_connection_dropped_mid_answer_is_not_called_unreachable(tiny_chat, broken):
    broken.behaviour.update(chat="reset")
    line = one_line_error(ask(tiny_chat, broken, "--json"))
    assert "connection to the server at" in line and "broke during the answer" in line
    assert "cannot reach" not in line and "is it running" not in line


def test_openai_credentials_are_never_sent(tiny_chat, broken, monkeypatch):
    for name, value in [("OPENAI_API_KEY", "sk-secret"), ("OPENAI_ORG_ID", "org-1"), ("OPENAI_PROJECT_ID", "p-1")]:
        monkeypatch.setenv(name, value)
    assert ask(tiny_chat, broken, "--json").exit_code == 0
    sent = {name: value for head in broken.heads for name, value in head.items()}
    assert sent["authorization"] == "Bearer EMPTY"
    assert "sk-secret" not in json.dumps(broken.heads) and "openai-organization" not in sent
    broken.heads.clear()
    monkeypatch.setenv("LONGDOC_API_KEY", "mine")
    assert ask(tiny_chat, broken, "--json").exit_code == 0
    assert {head["authorization"] for head in broken.heads} == {"Bearer mine"}


def test_a_key_over_plain_http_to_another_machine_is_warned_about():
    assert remote.exposed_key("http://gpu-box:8000/v1", "k")
    assert remote.exposed_key("http://10.0.0.5:8000/v1", "k")
    assert not remote.exposed_key("https://gpu-box/v1", "k")
    assert not remote.exposed_key("http://127.0.0.1:8000/v1", "k")
    assert not remote.exposed_key("http://localhost:8000/v1", "k")
    assert not remote.exposed_key("http://[::1]:8000/v1", "k")
    assert not remote.exposed_key("http://gpu-box:8000/v1", None)


# --------------------------------------------------------------------------------------------------
# 8. control sequences in answers


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_answers_are_escaped_for_a_terminal_and_exact_elsewhere():
    assert terminal_safe(HOSTILE) == "\\x1b]0;TITLE\\x07\\x1b[31mred\\x0f\\x14\\r over\n\tnext \\x9b2J"
    terminal, pipe = Tty(), io.StringIO()
    for out in (terminal, pipe):
        reporter = Reporter(out=out)
        for piece in (HOSTILE[:3], HOSTILE[3:]):  # streamed in pieces, as the tokens come
            reporter.stream(piece)
    assert terminal.getvalue() == terminal_safe(HOSTILE) and pipe.getvalue() == HOSTILE
    as_json = Reporter(out=Tty(), json_mode=True)
    as_json.json({"answer": HOSTILE})
    assert json.loads(as_json.out.getvalue())["answer"] == HOSTILE  # --json: exact, and escaped by JSON


def test_a_remote_answer_reaches_a_terminal_escaped_and_a_pipe_exact(tiny_chat, broken):
    broken.behaviour.update(text=HOSTILE, name="tiny\x1b]0;NAME\x07")  # the server's model name too
    piped = ask(tiny_chat, broken)
    assert piped.exit_code == 0 and piped.stdout == HOSTILE.strip() + "\n"
    assert json.loads(ask(tiny_chat, broken, "--json").stdout)["answer"] == HOSTILE.strip()
    # the real CLI with a terminal as stdout
    master, slave = pty.openpty()
    args = [
        sys.executable,
        "-m",
        "longdoc",
        "ask",
        NOTES,
        "Which port?",
        "--model",
        tiny_chat,
        "--endpoint",
        broken.url,
    ]
    proc = subprocess.Popen(args, stdout=slave, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, cwd=REPO)
    os.close(slave)
    shown = b""
    try:
        while True:
            if select.select([master], [], [], 60)[0]:
                try:
                    data = os.read(master, 65536)
                except OSError:  # the other end closed (Linux)
                    break
                if not data:
                    break
                shown += data
            elif proc.poll() is not None:
                break
        assert proc.wait(60) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    text = shown.decode("utf-8", "replace")
    assert proc.stderr is not None and "\x1b" not in proc.stderr.read().decode()  # status and stats lines
    assert "\x1b" not in text and "\x07" not in text and "\x9b" not in text and "\x0f" not in text
    assert "\\x1b]0;TITLE\\x07\\x1b[31mred" in text and "\\x9b2J" in text

"""``longdoc serve`` against what a web page or a hostile client sends (issue 27): real servers on a loopback
port over the tiny random-weight model of test_serve, driven with httpx and raw sockets.

Each test stands for one finding of the review: cross-site requests to a key-less server, clients that
leave while queued, work done before admission (huge bodies, over-long text, tokenizing past the queue),
slow-loris connections, and the document cache shared with the user's own.
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import threading
import time
from dataclasses import replace
from typing import Any

import httpx
import pytest

from longdoc.runtime import doccache, local
from longdoc.store import documents_dir

from .serve_helpers import KEY, NEW, USER, Served, answer_locally, ask_messages, replace_cfg, start, stop

SMALL = {"messages": [USER], "max_tokens": 2}


def address(served: Served) -> tuple[str, int]:
    host, port = served.url.split("//")[1].split("/")[0].rsplit(":", 1)
    return host, int(port)


def wait_for(condition: Any, timeout: float = 15.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.02)
    return False


def head(served: Served, length: int, key: str | None = KEY) -> bytes:
    """A chat-completions request head (HTTP/1.1) announcing a JSON body of ``length`` bytes."""
    host, port = address(served)
    lines = [
        "POST /v1/chat/completions HTTP/1.1",
        f"Host: {host}:{port}",
        "Content-Type: application/json",
        f"Content-Length: {length}",
    ]
    if key:
        lines.append(f"Authorization: Bearer {key}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_answer(sock: socket.socket) -> bytes:
    """A whole HTTP answer (head and its Content-Length of body) from ``sock``, or what came before it closed."""
    answer = b""
    while True:
        top, sep, body = answer.partition(b"\r\n\r\n")
        lines = top.lower().split(b"\r\n")
        length = next((int(line[15:]) for line in lines if line.startswith(b"content-length:")), 0)
        if sep and len(body) >= length:
            return answer
        data = sock.recv(65536)
        if not data:
            return answer
        answer += data


def closed(sock: socket.socket) -> bool:
    """Whether the server closed ``sock`` (anything it sent before is read and dropped)."""
    while select.select([sock], [], [], 0)[0]:
        try:
            if not sock.recv(65536):
                return True
        except OSError:
            return True
    return False


# --------------------------------------------------------------------------------------------------
# 1. cross-site requests and DNS rebinding


def test_a_keyless_server_answers_only_json_addressed_to_this_machine(session):
    served = start(session, api_key=None)
    try:
        _, port = address(served)
        body = json.dumps(SMALL)
        # what a web page may send to any address without asking first: a "simple" request
        simple = served.post(body, key=None, **{"Content-Type": "text/plain", "Origin": "http://attacker.example"})
        assert simple.status_code == 415 and "application/json" in simple.json()["error"]["message"]
        untyped = httpx.post(f"{served.url}/chat/completions", content=body, timeout=30)
        assert untyped.status_code == 415
        # DNS rebinding: the page's own name reaches this port, and is sent as the Host
        rebound = served.post(body, key=None, Host=f"attacker.example:{port}")
        assert rebound.status_code == 400 and "host" in rebound.text.lower()
        models = httpx.get(f"{served.url}/models", headers={"Host": "attacker.example"}, timeout=30)
        assert models.status_code == 400
        for name in ("localhost", "127.0.0.1", "[::1]"):
            answer = served.post(body, key=None, Host=f"{name}:{port}")
            assert answer.status_code == 200, (name, answer.text)
        typed = served.post(body, key=None, **{"Content-Type": "application/json; charset=utf-8"})
        assert typed.status_code == 200
    finally:
        stop(served)


def test_with_a_key_the_key_guards_and_any_host_name_is_answered(session):
    served = start(session)
    try:
        assert served.post(SMALL, Host="gpu-box.example").status_code == 200
        assert served.post(SMALL, key=None, Host="gpu-box.example").status_code == 401
        assert served.post(json.dumps(SMALL), **{"Content-Type": "text/plain"}).status_code == 415
    finally:
        stop(served)


# --------------------------------------------------------------------------------------------------
# 2. clients that leave while queued


def test_clients_that_leave_while_queued_give_their_slots_back(session, gate):
    served = start(session, concurrency=1, queue=8)
    try:
        holder = threading.Thread(target=lambda: served.post({"messages": [USER], "max_tokens": 4}))
        holder.start()
        assert wait_for(lambda: served.scheduler.running == 1), "the first request never ran"

        def gives_up() -> None:  # a non-streamed client with a short timeout
            with pytest.raises(httpx.ReadTimeout):
                served.post(SMALL, timeout=1.0)

        def hangs_up() -> None:  # a streamed client that reads the first event, then leaves
            with httpx.stream(
                "POST",
                f"{served.url}/chat/completions",
                json={**SMALL, "stream": True},
                headers={"Authorization": f"Bearer {KEY}"},
                timeout=30,
            ) as response:
                assert response.status_code == 200
                next(line for line in response.iter_lines() if line.startswith("data:"))

        clients = [threading.Thread(target=gives_up if i % 2 else hangs_up) for i in range(8)]
        for client in clients:
            client.start()
        for client in clients:
            client.join(30)
        assert wait_for(lambda: served.health()["admitted"] == 1), served.health()
        # the next client waits for the slot instead of being refused
        late: list[int] = []
        waiting = threading.Thread(target=lambda: late.append(served.post(SMALL).status_code))
        waiting.start()
        assert wait_for(lambda: served.scheduler.admitted == 2)
        gate.set()
        holder.join(30)
        waiting.join(30)
        assert late == [200] and served.idle()
    finally:
        gate.set()
        stop(served)


# --------------------------------------------------------------------------------------------------
# 3. work before admission: body cap, character count, the queue


def test_a_body_over_the_cap_is_413_before_it_is_read(session):
    served = start(session, max_body=64 * 1024)
    try:
        t0 = time.monotonic()
        with socket.create_connection(address(served), timeout=10) as sock:
            sock.sendall(head(served, 200_000_000) + b"x" * 1024)  # 200 MB announced, 1 KB sent
            answer = read_answer(sock)
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert b"--max-body" in answer and time.monotonic() - t0 < 5

        def body() -> Any:  # chunked, no length announced: read up to the cap, then refused
            for _ in range(100):
                yield b"x" * 4096

        chunked = httpx.post(
            f"{served.url}/chat/completions",
            content=body(),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"},
            timeout=30,
        )
        assert chunked.status_code == 413
        assert served.idle() and served.post(SMALL).status_code == 200
    finally:
        stop(served)


def test_over_long_text_is_refused_before_it_is_tokenized(session, monkeypatch):
    served = start(session)  # the default cap: 1 MiB for this 3,000-token context
    tokenized: list[int] = []
    real = local.LocalBackend.split
    monkeypatch.setattr(local.LocalBackend, "split", lambda *a: tokenized.append(1) or real(*a))
    try:
        content = "word " * 100_000  # 500,000 characters: no 3,000 tokens of a 13-character vocabulary hold them
        response = served.post({"messages": [{"role": "user", "content": content}]})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == "context_length_exceeded" and "characters" in error["message"]
        assert tokenized == []
        assert served.post(SMALL).status_code == 200 and tokenized == [1]
    finally:
        stop(served)


def test_the_queue_bounds_requests_before_they_are_tokenized(session, gate, monkeypatch):
    served = start(session, concurrency=1, queue=0)
    try:
        holder = threading.Thread(target=lambda: served.post({"messages": [USER], "max_tokens": 4}))
        holder.start()
        assert wait_for(lambda: served.scheduler.running == 1)
        tokenized: list[int] = []
        real = local.LocalBackend.split
        monkeypatch.setattr(local.LocalBackend, "split", lambda *a: tokenized.append(1) or real(*a))
        busy = served.post(SMALL)
        assert busy.status_code == 429 and tokenized == []  # refused before its body was even read
        gate.set()
        holder.join(30)
        assert served.idle()
    finally:
        gate.set()
        stop(served)


# --------------------------------------------------------------------------------------------------
# 6. slow-loris


def test_slow_heads_and_bodies_are_cut_off(session):
    served = start(session, headers_timeout_s=1.0, body_timeout_s=1.5)
    sockets: list[socket.socket] = []
    try:
        for _ in range(50):  # heads that never end: one more header byte now and then
            sock = socket.create_connection(address(served), timeout=10)
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            sockets.append(sock)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 8 and not all(closed(s) for s in sockets):
            for sock in sockets:
                with contextlib.suppress(OSError):  # closed by the server already
                    sock.sendall(b"x")
            time.sleep(0.25)
        assert all(closed(s) for s in sockets), "slow heads were left open"
        assert time.monotonic() - t0 < 6  # a 1 s deadline, on a busy machine
        assert served.post(SMALL).status_code == 200  # served all along
        # a body that trickles: 408, then the connection goes
        with socket.create_connection(address(served), timeout=10) as sock:
            sock.sendall(head(served, 100))
            answer = b""
            t0 = time.monotonic()
            while b"\r\n\r\n" not in answer and time.monotonic() - t0 < 6:
                sock.sendall(b" ")
                if select.select([sock], [], [], 0.25)[0]:
                    answer += sock.recv(65536)
            assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert served.idle()
    finally:
        for sock in sockets:
            sock.close()
        stop(served)


# --------------------------------------------------------------------------------------------------
# 4. the document cache: the server's own, salted per key, hits told only to the key's holder


def test_served_requests_keep_a_cache_of_their_own_and_tell_hits_only_to_key_holders(session):
    question = "What is the TTL?"
    mine = answer_locally(session, question)  # the user's own entry, before any server moves the cache folder
    own = {e.key for e in doccache.entries()}
    assert len(own) == 1
    user_folder = documents_dir()
    messages, chars = ask_messages(question)
    body = {"messages": messages, "max_tokens": NEW, "longdoc_prefix_chars": chars}
    # a cap that any entry exceeds: each save evicts what it can, and may only reach its own folder
    tiny_cap = replace_cfg(session, replace(session.cfg, cache_max_gb=1e-9))

    def twice(api_key: str | None) -> list[dict[str, Any]]:
        served = start(tiny_cap, api_key=api_key)  # doc_cache="private", the default
        try:
            return [served.post(body, key=api_key).json() for _ in range(2)]
        finally:
            stop(served)

    keyless = twice(None)
    assert [out["choices"][0]["message"]["content"] for out in keyless] == [mine["answer"]] * 2
    prefix = {"prefix_tokens": mine["cache"]["prefix_tokens"]}
    assert [out["longdoc"]["cache"] for out in keyless] == [prefix, prefix]  # no hit or miss told
    keyed = twice(KEY)
    assert [out["longdoc"]["cache"]["hit"] for out in keyed] == [False, True]  # its own entry only
    assert twice("another-key")[0]["longdoc"]["cache"]["hit"] is False
    assert documents_dir() == user_folder  # put back once the servers stopped
    assert {e.key for e in doccache.entries()} == own  # the user's cache: not found, not written, not evicted
    served_folder = user_folder.parent / "served-documents"
    assert len(list(served_folder.glob("*.safetensors"))) == 1  # the tiny cap evicted the older served ones


@pytest.mark.parametrize(
    "args,fragment",
    [
        (("--doc-cache", "everyone"), "--doc-cache must be private or shared"),
        (("--max-body", "0"), "--max-body '0'"),
        (("--max-body", "lots"), "--max-body 'lots'"),
    ],
)
def test_bad_serve_limits_are_usage_errors_before_the_model_loads(args, fragment, monkeypatch):
    from typer.testing import CliRunner

    from longdoc.cli import app

    monkeypatch.setattr("longdoc.runtime.local.LocalBackend.loaded", lambda self: pytest.fail("loaded the model"))
    result = CliRunner().invoke(app, ["serve", "--port", "0", *args])
    assert result.exit_code == 2 and fragment in result.stderr, (result.exit_code, result.stderr)

"""``--endpoint``: ``ask``, ``summarize`` and ``chat`` against a real ``longdoc serve`` on a loopback port (the
tiny random-weight model, uvicorn in a thread), driven through the CLI (typer's CliRunner, in process).

What is checked: greedy answers through the server equal the local ones (single pass, map-reduce,
``--each``, chat); the JSON records the engine and the server's usage; each failure is one line with its
documented exit code; ``--each --concurrency 2`` keeps two requests in flight and the input order; Ctrl-C
keeps what arrived; the local weights are never loaded.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from longdoc.cli import app
from longdoc.config import RunConfig
from longdoc.runtime import remote
from longdoc.runtime.local import LocalBackend

from .helpers import REPO
from .serve_helpers import KEY, Collect, Served, spawn_server, start, stop

SAMPLES = REPO / "sample_docs"
NOTES = str(SAMPLES / "notes.md")
runner = CliRunner()
NEW = ("--max-new-tokens", "8")


def invoke(*args: str, input: str | None = None) -> Any:
    return runner.invoke(app, list(args), input=input)


@pytest.fixture(scope="module")
def server(tiny_chat) -> Iterator[Served]:
    """``longdoc serve`` over the tiny model with the settings a local ``--dtype float32`` run has, on the
    user's own document cache (``--doc-cache shared``): a remote answer finds the local run's entry."""
    session = LocalBackend(RunConfig(model=tiny_chat, dtype="float32"), Collect())
    served = start(session, concurrency=2, queue=8, doc_cache="shared")
    yield served
    stop(served)


@pytest.fixture
def local(tiny_chat) -> tuple[str, ...]:
    """The options of a local run; a remote run adds ``remote(server)``."""
    return ("--model", tiny_chat, "--dtype", "float32", *NEW)


def through(server: Served, key: str = KEY) -> tuple[str, ...]:
    return ("--endpoint", server.url, "--api-key", key)


def ok(result: Any) -> Any:
    assert result.exit_code == 0, (result.exit_code, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    return result


def one_line_error(result: Any, code: int) -> str:
    """The single error line of a failed run (the last on stderr), no traceback, nothing on stdout."""
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr and result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert [line for line in lines if line.startswith("error: ")] == lines[-1:], result.stderr
    return str(lines[-1])


@pytest.fixture
def fast_retries(monkeypatch) -> None:
    monkeypatch.setattr(remote, "RETRY_DELAYS_S", (0.01, 0.01))
    monkeypatch.setattr(remote, "MAX_RETRY_AFTER_S", 0.01)


# --------------------------------------------------------------------------------------------------
# answers: the same as local


def test_ask_through_the_endpoint_equals_the_local_answer(server, local):
    mine = json.loads(ok(invoke("ask", NOTES, "Which port?", *local, "--json")).stdout)
    theirs = json.loads(ok(invoke("ask", NOTES, "Which port?", *local, *through(server), "--json")).stdout)
    assert theirs["answer"] == mine["answer"] and mine["answer"]
    assert theirs["prompt_tokens"] == mine["prompt_tokens"] and theirs["generated_tokens"] == mine["generated_tokens"]
    # the request marked where the documents end: the server tokenized them as the local run did, so it
    # found the local run's document-cache entry (same token ids)
    assert theirs["server"]["cache"]["hit"] is True
    assert theirs["server"]["cache"]["prefix_tokens"] == mine["cache"]["prefix_tokens"]
    # streamed: the answer on stdout, nothing else there
    streamed = ok(invoke("ask", NOTES, "Which port?", *local, *through(server)))
    assert streamed.stdout.strip() == mine["answer"]


def test_json_records_the_engine_and_the_servers_usage(server, local, tiny_chat):
    mine = json.loads(ok(invoke("ask", NOTES, "Which port?", *local, "--json")).stdout)
    assert mine["engine"]["kind"] == "local"
    result = ok(invoke("ask", NOTES, "Which port?", *local, *through(server), "--json"))
    data = json.loads(result.stdout)
    assert data["engine"] == {
        "kind": "remote",
        "url": server.url,
        "model": "tiny",
        "context_length": server.scheduler.context_length,
        "tokenizer": "tiny",
    }
    assert data["model"] == "tiny"
    assert data["usage"] == {"prompt_tokens": data["prompt_tokens"], "completion_tokens": data["generated_tokens"]}
    t = data["timings"]
    assert 0 < t["ttft_s"] <= t["request_s"] and t["decode_s"] >= 0
    assert data["dca"]["applicable"] is False and data["recycle"]["applicable"] is False
    assert data["sources"] == mine["sources"]
    assert "--dtype: not applicable with --endpoint" in result.stderr  # set, and recorded as not applicable


def test_map_reduce_through_the_endpoint_equals_local(server, local):
    """A summary that needs map-reduce: the same steps, the same greedy answers, two requests at a time."""
    args = ("summarize", NOTES, *local, "--max-context", "700", "--json")
    mine = json.loads(ok(invoke(*args)).stdout)
    theirs = json.loads(ok(invoke(*args, *through(server), "--concurrency", "2")).stdout)
    assert mine["plan"]["mode"] == "map-reduce" and mine["plan"]["steps"] > 2
    assert theirs["plan"] == mine["plan"]
    assert theirs["answer"] == mine["answer"]
    assert theirs["prompt_tokens"] == mine["prompt_tokens"]
    assert theirs["usage"]["prompt_tokens"] == mine["prompt_tokens"]  # summed over the steps


@pytest.fixture
def inputs(tmp_path) -> list[str]:
    words = ["alpha", "bravo", "charlie", "delta", "echo"]
    paths = []
    for i, word in enumerate(words):
        path = tmp_path / f"{word}.txt"
        path.write_text(f"The {word} report. " + f"Item {i} of the {word} list costs {i * 7} euros. " * (3 + i))
        paths.append(str(path))
    return paths


def test_each_with_concurrency_keeps_the_order_and_two_in_flight(server, local, inputs, monkeypatch):
    each = ("summarize", "--each", "--json", *local, *inputs)
    mine = [json.loads(line) for line in ok(invoke(*each)).stdout.splitlines()]
    real = remote.RemoteBackend.request
    lock, flight = threading.Lock(), {"now": 0, "most": 0}

    def counted(self: Any, messages: list[dict[str, str]], *args: Any, **kw: Any) -> Any:
        with lock:
            flight["now"] += 1
            flight["most"] = max(flight["most"], flight["now"])
        try:
            if "alpha.txt" in messages[-1]["content"]:
                time.sleep(0.5)  # the first input finishes last: its line must still come first
            return real(self, messages, *args, **kw)
        finally:
            with lock:
                flight["now"] -= 1

    monkeypatch.setattr(remote.RemoteBackend, "request", counted)
    args = ("summarize", "--each", "--json", *local, *through(server), "--concurrency", "2", *inputs)
    theirs = [json.loads(line) for line in ok(invoke(*args)).stdout.splitlines()]
    assert [line["path"] for line in theirs] == inputs
    assert [line["summary"] for line in theirs] == [line["summary"] for line in mine]
    assert all("error" not in line and line["engine"]["kind"] == "remote" for line in theirs)
    assert flight["most"] == 2  # two at once, never more
    # without --json the summaries are printed whole, in input order too
    text = ok(invoke(*args[:2], *args[3:])).stdout
    assert text == "".join(line["summary"] + "\n" for line in mine)


def test_ctrl_c_during_each_with_concurrency_gives_the_next_input_its_line(server, local, inputs, monkeypatch):
    real = remote.RemoteBackend.request

    def interrupted_at_charlie(self: Any, messages: list[dict[str, str]], *args: Any, **kw: Any) -> Any:
        if "charlie.txt" in messages[-1]["content"]:
            raise KeyboardInterrupt  # carried to the main thread by its future, as a Ctrl-C there would arrive
        return real(self, messages, *args, **kw)

    monkeypatch.setattr(remote.RemoteBackend, "request", interrupted_at_charlie)
    result = invoke("summarize", "--each", "--json", *local, *through(server), "--concurrency", "2", *inputs)
    assert result.exit_code == 130 and "Traceback" not in result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["path"] for line in lines] == inputs[:3]
    assert "interrupted" not in lines[1] and lines[2]["interrupted"] is True and lines[2]["summary"] == ""


def test_several_questions_are_one_request_each(server, local):
    args = ("ask", NOTES, "-Q", "Which port?", "-Q", "And the TTL?", *local, "--json")
    mine = [json.loads(line) for line in ok(invoke(*args)).stdout.splitlines()]
    theirs = [json.loads(line) for line in ok(invoke(*args, *through(server))).stdout.splitlines()]
    assert [(r["question"], r["answer"]) for r in theirs] == [(r["question"], r["answer"]) for r in mine]
    assert [r["server"]["cache"]["hit"] for r in theirs] == [True, True]  # the documents' prefix, shared


def test_chat_from_a_pipe(server, local):
    questions = "Which port?\nAnd the TTL?\n"
    result = ok(invoke("chat", NOTES, *local, *through(server), "--json", input=questions))
    first, second = (json.loads(line) for line in result.stdout.splitlines())
    assert (first["turn"], first["question"], second["turn"], second["question"]) == (
        1,
        "Which port?",
        2,
        "And the TTL?",
    )
    # the first turn is the ask prompt; the second carries the conversation so far
    asked = json.loads(ok(invoke("ask", NOTES, "Which port?", *local, *through(server), "--json")).stdout)
    assert first["answer"] == asked["answer"]
    assert second["prompt_tokens"] > first["prompt_tokens"] + first["generated_tokens"]


def test_the_local_weights_are_never_loaded(server, local, monkeypatch):
    def refuse(*_args: Any, **_kw: Any) -> None:
        raise AssertionError("loaded the local model")

    monkeypatch.setattr("longdoc.models.load_model", refuse)
    ok(invoke("ask", NOTES, "Which port?", *local, *through(server), "--json"))


# --------------------------------------------------------------------------------------------------
# failures: one line, the documented exit code


def test_a_prompt_over_the_servers_context_exits_4(server, local, monkeypatch):
    # checked here, before any request, with the local tokenizer and the reported context length
    line = one_line_error(invoke("ask", NOTES, "Which port?", *local, *through(server), "--max-context", "500"), 4)
    assert "exceeds the context limit of 500" in line
    # the server's own refusal (its count is the one that matters): the same exit code
    monkeypatch.setattr(remote, "reported_context", lambda card: 10**6)
    monkeypatch.setattr("longdoc.runtime.plan.DCA_CONTEXT_FACTOR", 0)  # the server's fit check: every prompt is over
    line = one_line_error(invoke("ask", NOTES, "Which port?", *local, *through(server)), 4)
    assert "says the prompt does not fit" in line and "context limit" in line


def test_a_wrong_key_exits_2(server, local):
    line = one_line_error(invoke("ask", NOTES, "Which port?", *local, *through(server, key="wrong")), 2)
    assert "refused the API key (401" in line and "--api-key" in line


def test_an_unreachable_server_exits_3_after_retries(local, fast_retries):
    with socket.socket() as sock:  # a port nobody listens on: connections are refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = invoke("ask", NOTES, "Which port?", *local, "--endpoint", f"http://127.0.0.1:{port}")
    line = one_line_error(result, 3)
    assert f"cannot reach the server at http://127.0.0.1:{port}/v1" in line
    assert result.stderr.count("retrying in") == 2


def test_an_unknown_model_exits_3(server, local):
    line = one_line_error(invoke("ask", NOTES, "?", *local, *through(server), "--remote-model", "gpt-x"), 3)
    assert "does not serve 'gpt-x'" in line and "'tiny'" in line


def test_a_server_failure_exits_3(server, local, monkeypatch):
    def boom(*_args: Any, **_kw: Any) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr("longdoc.runtime.local.Conversation.answer", boom)
    line = one_line_error(invoke("ask", NOTES, "Which port?", *local, *through(server)), 3)
    assert "internal error: RuntimeError: boom" in line


def test_busy_and_unavailable_are_retried(server, local, monkeypatch, fast_retries):
    from longdoc import serve

    real, refusals = serve.Scheduler.submit, [429, 503]

    def refusing(self: Any, job: Any) -> Any:
        if refusals:  # 429 comes with Retry-After (longdoc serve says 1 s), 503 without
            raise serve.ApiError(refusals.pop(0), "busy", "rate_limit_error", "server_busy")
        return real(self, job)

    monkeypatch.setattr(serve.Scheduler, "submit", refusing)
    result = ok(invoke("ask", NOTES, "Which port?", *local, *through(server), "--json"))
    assert refusals == [] and result.stderr.count("retrying in") == 2
    refusals.extend([429] * 10)  # busy for longer than the retries last
    line = one_line_error(invoke("ask", NOTES, "Which port?", *local, *through(server)), 3)
    assert "still busy after 2 retries" in line


def test_a_server_that_refuses_the_prefix_field_gets_requests_without_it(server, local, monkeypatch):
    from longdoc import serve

    real = serve.parse_request

    def strict(body: Any) -> Any:
        if "longdoc_prefix_chars" in body:
            raise serve.ApiError(400, "Unrecognized request argument supplied: longdoc_prefix_chars")
        return real(body)

    monkeypatch.setattr(serve.protocol, "parse_request", strict)
    result = ok(invoke("ask", NOTES, "Which port?", *local, *through(server), "--json"))
    assert "refuses 'longdoc_prefix_chars'" in result.stderr
    assert json.loads(result.stdout)["generated_tokens"] > 0


@pytest.mark.parametrize(
    "args,fragment",
    [
        (("--endpoint", "ftp://host/v1"), "not an http"),
        (("--endpoint", "http://host:port/v1"), "not an http"),
        (("--endpoint", "http://127.0.0.1:9/v1", "--quantize", "int4"), "--quantize"),
        (("--remote-model", "x"), "go with --endpoint"),
        (("--concurrency", "2"), "go with --endpoint"),
        (("--endpoint", "http://127.0.0.1:9/v1", "--concurrency", "0"), "--concurrency"),
        (("--timeout", "5"), "go with --endpoint"),
        (("--endpoint", "http://127.0.0.1:9/v1", "--timeout", "0"), "--timeout must be more than 0"),
    ],
)
def test_bad_remote_options_are_usage_errors_before_any_work(args, fragment):
    line = one_line_error(invoke("summarize", "/nonexistent.pdf", *args), 2)
    assert fragment in line


def test_without_a_reported_context_length_max_context_is_needed(server, local, monkeypatch):
    monkeypatch.setattr(remote, "reported_context", lambda card: None)
    line = one_line_error(invoke("ask", NOTES, "Which port?", *local, *through(server)), 2)
    assert "pass --max-context" in line
    data = json.loads(ok(invoke("ask", NOTES, "?", *local, *through(server), "--max-context", "9000", "--json")).stdout)
    assert data["engine"]["context_length"] == 9000


def test_ctrl_c_keeps_what_arrived(server, local, monkeypatch):
    from longdoc.render import Reporter

    real, pieces = Reporter.stream, {"n": 0}

    def interrupted_after_two(self: Reporter, text: str) -> None:
        pieces["n"] += 1
        if pieces["n"] > 2:
            raise KeyboardInterrupt
        real(self, text)

    monkeypatch.setattr(Reporter, "stream", interrupted_after_two)
    result = invoke("ask", NOTES, "Which port?", *local, *through(server), "--json", "--max-new-tokens", "64")
    assert result.exit_code == 130 and "Traceback" not in result.stderr
    data = json.loads(result.stdout)
    assert data["interrupted"] is True and data["answer"] and data["engine"]["kind"] == "remote"
    assert server.idle(), "the server went on generating for a client that left"


# --------------------------------------------------------------------------------------------------
# the real embedded model


@pytest.mark.slow
def test_embedded_model_through_longdoc_serve_equals_local(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc, url = spawn_server([sys.executable, "-m", "longdoc", "serve", "--port", str(port)])
    try:
        args = ("ask", str(SAMPLES / "report.pdf"), "What was the measured throughput of the Heron pump?")
        args += ("--max-new-tokens", "16", "--json")
        mine = json.loads(ok(invoke(*args)).stdout)
        theirs = json.loads(ok(invoke(*args, "--endpoint", url)).stdout)
        assert theirs["answer"] == mine["answer"] and mine["answer"]
        assert theirs["usage"]["prompt_tokens"] == mine["prompt_tokens"]
        assert theirs["engine"]["url"] == url and mine["engine"]["kind"] == "local"
    finally:
        proc.terminate()
        proc.wait(60)


def test_remote_module_imports_no_http_client():
    """``longdoc.runtime.remote`` imports openai only when a remote session starts (local runs never pay for it)."""
    code = "import sys, longdoc.runtime.remote; print('openai' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(REPO))
    assert out.stdout.strip() == "False"

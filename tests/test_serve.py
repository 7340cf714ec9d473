"""``longdoc serve``: a real server on a loopback port (uvicorn in a thread, through ``serve.serve``) over a
tiny random-weight model with DCA and recycled decoding on, driven through the ``openai`` client and httpx.

Greedy answers through the server equal the local pipeline's; a request shaped like the local ask prompt
gets its token ids (so its document-cache entry); bad requests get 4xx and the server carries on.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

# fastapi, uvicorn, openai and httpx come with the dev extra: a missing one fails here, never skips
import httpx
import openai
import pytest

from longdoc import serve
from longdoc.errors import DoesNotFitError
from longdoc.prompt import ask_prompt, format_documents  # noqa: E402

from .serve_helpers import (
    DOC,
    KEY,
    MAX_CONTEXT,
    NEW,
    USER,
    Served,
    answer_locally,
    ask_messages,
    spawn_server,
    start,
    stop,
)


@pytest.fixture(scope="module")
def server(session) -> Iterator[Served]:
    # the user's own document cache, as a local run: a request shaped like the local prompt must find
    # the local run's entry (the same token ids); the default, private cache is tested on its own
    served = start(session, concurrency=2, queue=8, doc_cache="shared")
    yield served
    stop(served)


# --------------------------------------------------------------------------------------------------
# prompts: the same token ids as the local path


def chat_prompt(tokenizer: Any, messages: list[dict[str, str]], chars: int | None = None) -> Any:
    """``serve.chat_prompt`` of messages as a request's JSON writes them."""
    return serve.chat_prompt(tokenizer, [serve.Message(**m) for m in messages], chars)


@pytest.mark.parametrize("chat_template", [True, False])
def test_ask_shaped_request_gets_the_local_token_ids(session, chat_template, monkeypatch):
    tokenizer = session.tokenizer
    if not chat_template:  # the fallback layout of a model without a chat template
        monkeypatch.setattr(tokenizer, "chat_template", None)
    messages, chars = ask_messages("What is the TTL?")
    served = chat_prompt(tokenizer, messages, chars)
    mine = ask_prompt(tokenizer, [DOC], "What is the TTL?")
    assert served.prefix == mine.prefix and served.request == mine.request
    assert session.split(served) == session.split(mine)
    assert len(session.split(served)[0]) > 256  # long enough for the document cache


def test_blank_line_heuristic_splits_the_last_user_message():
    messages = [{"role": "user", "content": "A long document.\n\nWith paragraphs.\n\nWhat is it?"}]
    prompt = chat_prompt(None, messages)  # no template: the fallback layout
    assert prompt.prefix == "A long document.\n\nWith paragraphs."
    assert prompt.request == "\n\nWhat is it?\n\nAnswer:"
    assert chat_prompt(None, messages, 0).prefix == ""
    one_line = [{"role": "system", "content": "S"}, {"role": "user", "content": "no blank line"}]
    assert chat_prompt(None, one_line).prefix == "S\n\n"  # everything before the message


def test_prefix_mark_cannot_be_smuggled_in():
    text = "doc \ue000longdoc-prefix\ue000 more\n\nq"
    prompt = chat_prompt(None, [{"role": "user", "content": text}])
    assert "\ue000" not in prompt.text and prompt.prefix == "doc longdoc-prefix more"


# --------------------------------------------------------------------------------------------------
# answers


def test_models_health_and_status_line(server, session):
    models = server.client().models.list().data
    assert [m.id for m in models] == [session.info.name]
    assert models[0].model_extra["max_model_len"] == MAX_CONTEXT
    health = httpx.get(server.url.removesuffix("/v1") + "/health", timeout=10)  # open without a token
    assert health.status_code == 200 and health.json()["model"] == session.info.name
    assert f"serving {session.info.name} on {server.url}" in session.reporter.lines
    assert server.url.startswith("http://127.0.0.1:")


def test_greedy_answer_equals_the_local_one_with_the_same_token_ids(server, session):
    expected = answer_locally(session, "What is the TTL?")  # writes the prefix's document-cache entry
    assert expected["cache"]["hit"] is False and expected["cache"]["bytes"] > 0
    messages, chars = ask_messages("What is the TTL?")
    out = server.client().chat.completions.create(
        model=session.info.name, messages=messages, max_tokens=NEW, extra_body={"longdoc_prefix_chars": chars}
    )
    choice = out.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected["answer"]
    assert out.usage.prompt_tokens == expected["prompt_tokens"]
    assert out.usage.completion_tokens == expected["generated_tokens"]
    assert out.usage.total_tokens == expected["prompt_tokens"] + expected["generated_tokens"]
    assert choice.finish_reason == ("length" if expected["generated_tokens"] == NEW else "stop")
    # the server found the local run's entry: its key hashes the prefix's token ids, which the load checks
    cache = out.model_extra["longdoc"]["cache"]
    assert cache["hit"] is True and cache["prefix_tokens"] == expected["cache"]["prefix_tokens"]
    assert out.model_extra["longdoc"]["dca"]["enabled"] and out.model_extra["longdoc"]["recycle"]["enabled"]


def test_streaming_concatenates_to_the_answer(server, session):
    messages, chars = ask_messages("Which port?")
    body = {"model": session.info.name, "messages": messages, "max_tokens": NEW, "longdoc_prefix_chars": chars}
    whole = server.post(body).json()
    chunks = list(
        server.client().chat.completions.create(
            **{k: v for k, v in body.items() if k != "longdoc_prefix_chars"},
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"longdoc_prefix_chars": chars},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole["choices"][0]["message"]["content"] == answer_locally(session, "Which port?")["answer"]
    assert text  # something was generated to compare
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == whole["choices"][0]["finish_reason"]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump(include={"prompt_tokens", "completion_tokens"}) == {
        "prompt_tokens": whole["usage"]["prompt_tokens"],
        "completion_tokens": whole["usage"]["completion_tokens"],
    }
    # the raw stream: server-sent events ending in [DONE]; no usage chunk unless asked
    with httpx.stream(
        "POST",
        f"{server.url}/chat/completions",
        json={**body, "stream": True},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    events = list(serve.iter_sse(iter(lines)))
    assert all(e["object"] == "chat.completion.chunk" and e["choices"] for e in events)


def test_two_requests_about_one_document_share_its_prefix(server, session):
    """Without the extension field the last blank line marks the prefix: two questions share it."""
    documents = format_documents([DOC])
    client = server.client()
    first, second = (
        client.chat.completions.create(
            model=session.info.name, messages=[{"role": "user", "content": f"{documents}\n\n{q}"}], max_tokens=4
        )
        for q in ("What is the TTL?", "Which port does the service use?")
    )
    a, b = first.model_extra["longdoc"]["cache"], second.model_extra["longdoc"]["cache"]
    assert a["hit"] is False and a["bytes"] > 0 and b["hit"] is True
    assert a["prefix_tokens"] == b["prefix_tokens"] > 256


def test_conversation_turns_are_rendered_with_the_template(server, session):
    messages, _ = ask_messages("What is the TTL?")
    turns = [*messages, {"role": "assistant", "content": "300 seconds."}, {"role": "user", "content": "And the port?"}]
    out = server.client().chat.completions.create(model=session.info.name, messages=turns, max_tokens=4)

    def tokens(msgs: list[dict[str, str]]) -> int:
        return sum(len(ids) for ids in session.split(chat_prompt(session.tokenizer, msgs)))

    assert out.usage.prompt_tokens == tokens(turns) > tokens(messages)


def test_concurrent_requests_equal_sequential_ones(server, session):
    questions = ["What is the TTL?", "Which port?", "How fast is the pump?"]
    sequential = {q: answer_locally(session, q)["answer"] for q in questions}
    answers: dict[str, str] = {}
    failures: list[BaseException] = []

    def ask(q: str) -> None:
        try:
            messages, chars = ask_messages(q)
            out = server.client().chat.completions.create(
                model=session.info.name, messages=messages, max_tokens=NEW, extra_body={"longdoc_prefix_chars": chars}
            )
            answers[q] = out.choices[0].message.content
        except BaseException as exc:  # noqa: BLE001 (reported below)
            failures.append(exc)

    threads = [threading.Thread(target=ask, args=(q,)) for q in questions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not failures and answers == sequential
    assert server.idle()


# --------------------------------------------------------------------------------------------------
# errors


def test_over_long_prompt_is_400_with_the_exit_4_message(server, session):
    docs = [replace(DOC, segments=DOC.segments * 6)]
    question = "What is the TTL?"
    with pytest.raises(DoesNotFitError) as local_error:
        session.run(ask_prompt(session.tokenizer, docs, question), [])
    messages, chars = ask_messages(question, docs)
    response = server.post({"messages": messages, "max_tokens": NEW, "longdoc_prefix_chars": chars})
    assert response.status_code == 400
    error = response.json()["error"]
    assert "exceeds the context limit" in error["message"]
    assert error["message"] == local_error.value.message
    assert error["code"] == "context_length_exceeded" and error["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError, match="exceeds the context limit"):
        server.client().chat.completions.create(model=session.info.name, messages=messages, stream=True)
    # a prompt that fits only without the default answer budget gets the room that is left
    assert server.scheduler.context_length == MAX_CONTEXT


MALFORMED = [
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe", "not valid JSON"),
    ([USER], "must be a JSON object"),
    ({}, "'messages'"),
    ({"messages": "hi"}, "'messages'"),
    ({"messages": []}, "'messages'"),
    ({"messages": ["hi"]}, "messages[0]"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "role"),
    ({"messages": [{"content": "x"}]}, "role"),
    ({"messages": [{"role": ["user"], "content": "x"}]}, "role"),  # found by tests/fuzz/serve_faults.py
    ({"messages": [{"role": {}, "content": "x"}]}, "role"),
    ({"messages": [{"role": "user", "content": "  "}]}, "empty"),
    ({"messages": [{"role": "user", "content": 5}]}, "content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "text parts"),
    ({"messages": [USER, {"role": "assistant", "content": "x"}]}, "last message"),
    ({"messages": [USER], "max_tokens": 0}, "max_tokens"),
    ({"messages": [USER], "max_tokens": "8"}, "max_tokens"),
    ({"messages": [USER], "max_completion_tokens": True}, "max_completion_tokens"),
    ({"messages": [USER], "temperature": -0.5}, "temperature"),
    ({"messages": [USER], "top_p": 0}, "top_p"),
    ({"messages": [USER], "top_p": 1.5}, "top_p"),
    ({"messages": [USER], "stream": "yes"}, "stream"),
    ({"messages": [USER], "n": 2}, "n=1"),
    ({"messages": [USER], "stop": ["\n"]}, "stop"),
    ({"messages": [USER], "longdoc_prefix_chars": 999}, "longdoc_prefix_chars"),
    ({"messages": [USER], "model": 7}, "'model'"),
    # once 500s, or accepted: out of range, or nested past the parser's recursion limit
    ({"messages": [USER], "seed": 2**64}, "seed"),
    ({"messages": [USER], "temperature": 5}, "temperature"),
    ({"messages": [USER], "temperature": 1e308}, "temperature"),
    (b"[" * 100_000, "nested"),
    # once ignored, though they change what the answer means
    ({"messages": [USER], "response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": [USER], "logit_bias": {"5": 10}}, "logit_bias"),
    ({"messages": [USER], "tool_choice": "required"}, "tool_choice"),
    ({"messages": [USER], "presence_penalty": 0.5}, "presence_penalty"),
    ({"messages": [USER], "frequency_penalty": -1}, "frequency_penalty"),
    ({"messages": [USER], "top_logprobs": 3}, "top_logprobs"),
    ({"messages": [USER], "logprobs": True}, "logprobs"),
]


def test_malformed_requests_get_400_with_one_line(server):
    for body, needle in MALFORMED:
        response = server.post(body if isinstance(body, bytes) else json.dumps(body))
        assert response.status_code == 400, (body, response.text)
        error = response.json()["error"]
        assert needle in error["message"] and "\n" not in error["message"], (body, error)
        assert error["type"] == "invalid_request_error"
    response = server.post(b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}')
    assert response.status_code == 400 and "temperature" in response.json()["error"]["message"]
    unknown = server.post({"model": "gpt-4o", "messages": [USER]})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    assert server.post({"messages": [USER], "max_tokens": 2}).status_code == 200  # still serving


def test_neutral_values_and_tiny_temperatures_are_answered(server):
    greedy = server.post({"messages": [USER], "max_tokens": 4, "temperature": 0}).json()["choices"][0]["message"]
    neutral = {"response_format": {"type": "text"}, "logit_bias": {}, "presence_penalty": 0, "tool_choice": "none"}
    for extra in ({"temperature": 1e-39}, {"temperature": 5e-324}, neutral, {"seed": -(2**63)}):
        response = server.post({"messages": [USER], "max_tokens": 4, **extra})
        assert response.status_code == 200, (extra, response.text)
        assert response.json()["choices"][0]["message"] == greedy, extra  # below 1e-5: greedy


def test_token_is_required_on_v1_routes(server, session):
    for key in (None, "wrong", f"{KEY}x"):
        response = server.post({"messages": [USER], "max_tokens": 2}, key=key)
        assert response.status_code == 401, key
        assert response.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{server.url}/models", headers={"Authorization": f"Bearer {key}"}).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong").chat.completions.create(model=session.info.name, messages=[USER], max_tokens=2)
    assert httpx.get(f"{server.url}/models", headers={"Authorization": f"bearer {KEY}"}).status_code == 200


def test_a_failing_request_is_500_and_the_server_carries_on(server, session, monkeypatch):
    def boom(*_args: Any, **_kw: Any) -> None:
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr("longdoc.runtime.local.Conversation.answer", boom)
    response = server.post({"messages": [USER], "max_tokens": 2})
    assert response.status_code == 500
    assert response.json()["error"]["message"] == "internal error: RuntimeError: boom"
    with pytest.raises(openai.APIError, match="boom"):
        list(server.client().chat.completions.create(model=session.info.name, messages=[USER], stream=True))
    # the error event ends the stream as any stream ends: data: [DONE]
    with httpx.stream(
        "POST",
        f"{server.url}/chat/completions",
        json={"messages": [USER], "stream": True},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    ) as response:
        lines = [line for line in response.iter_lines() if line]
    assert "boom" in lines[-2] and lines[-1] == "data: [DONE]"
    monkeypatch.undo()
    assert server.post({"messages": [USER], "max_tokens": 2}).status_code == 200
    assert server.idle()


# --------------------------------------------------------------------------------------------------
# slots: the queue, and clients that leave


def test_full_queue_gets_429_and_the_slot_comes_back(session, gate):
    served = start(session, concurrency=1, queue=0)
    try:
        results: list[Any] = []
        first = threading.Thread(target=lambda: results.append(served.post({"messages": [USER], "max_tokens": 4})))
        first.start()
        end = time.monotonic() + 30
        while served.scheduler.running == 0 and time.monotonic() < end:  # the first request holds the slot
            time.sleep(0.01)
        busy = served.post({"messages": [USER], "max_tokens": 4})
        assert busy.status_code == 429 and busy.headers["retry-after"]
        assert busy.json()["error"]["code"] == "server_busy"
        with pytest.raises(openai.RateLimitError):
            served.client().chat.completions.create(model=session.info.name, messages=[USER], stream=True)
        gate.set()
        first.join(30)
        assert results[0].status_code == 200 and results[0].json()["usage"]["completion_tokens"] > 0
        assert served.idle()
        assert served.post({"messages": [USER], "max_tokens": 4}).status_code == 200  # the slot is free again
    finally:
        gate.set()
        stop(served)


def test_client_leaving_mid_stream_stops_its_generation(server, session, gate):
    messages, chars = ask_messages("What is the TTL?")
    body = {"messages": messages, "max_tokens": 200, "stream": True, "longdoc_prefix_chars": chars}
    before = dict(server.scheduler.stats)
    received = []
    with httpx.stream(
        "POST", f"{server.url}/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
    ) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        received.append(next(line for line in lines if line.startswith("data:")))  # the role chunk
        gate.set()  # decoding goes on; the client leaves after the first piece of text
        received.append(next(line for line in lines if '"content"' in line and line.startswith("data:")))
    assert server.idle(), "the generation went on after its client left"
    assert server.scheduler.stats["cancelled"] == before["cancelled"] + 1
    assert server.scheduler.stats["completed"] == before["completed"]
    # the server carries on: the next request is answered, and equals the local greedy answer
    out = server.client().chat.completions.create(
        model=session.info.name,
        messages=messages,
        max_tokens=NEW,
        extra_body={"longdoc_prefix_chars": chars},
    )
    assert out.choices[0].message.content == answer_locally(session, "What is the TTL?")["answer"]


def test_client_leaving_a_non_streamed_request_stops_it(server, gate):
    before = dict(server.scheduler.stats)
    with pytest.raises(httpx.ReadTimeout):
        server.post({"messages": [USER], "max_tokens": 200}, timeout=1.0)
    assert server.scheduler.running == 1  # still held by the gate
    gate.set()
    assert server.idle()
    assert server.scheduler.stats["cancelled"] == before["cancelled"] + 1


def test_serve_refuses_bad_slot_counts(session):
    from longdoc.errors import UsageError

    for kw in ({"concurrency": 0}, {"queue": -1}):
        with pytest.raises(UsageError):
            serve.create_app(session, api_key=None, **kw)


def test_importing_serve_does_not_import_fastapi():
    import subprocess
    import sys

    code = "import sys, longdoc.serve; print(sorted(m for m in ('fastapi', 'uvicorn', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path.cwd())
    assert out.stdout.strip() == "[]"


def test_streamed_text_is_cut_like_the_answer():
    visible = serve.VisibleText()
    pieces = [visible.push(p) for p in ("\n ", "Paris", " is", " ", "\n", "big", " \n")]
    assert pieces == ["", "Paris", " is", "", "", " \nbig", ""]
    assert "".join(pieces) + visible.finish("Paris is \nbig") == "Paris is \nbig"
    held = serve.VisibleText()
    held.push("caf")  # a last character the streamer held back as incomplete arrives with the answer
    assert held.finish("café") == "é"


def test_without_max_tokens_the_answer_gets_the_room_left(server, session):
    def tokens(content: str) -> int:
        msgs = [{"role": "user", "content": content}]
        return sum(len(ids) for ids in session.split(chat_prompt(session.tokenizer, msgs)))

    content = "x" * (MAX_CONTEXT - 3)
    while tokens(content) > MAX_CONTEXT - 3:  # a prompt 3 tokens short of the limit
        content = content[: len(content) - (tokens(content) - (MAX_CONTEXT - 3))]
    assert tokens(content) > MAX_CONTEXT - NEW  # the default budget would not fit
    response = server.post({"messages": [{"role": "user", "content": content}]})
    assert response.status_code == 200, response.text
    usage = response.json()["usage"]
    assert usage["prompt_tokens"] == tokens(content) and usage["completion_tokens"] <= MAX_CONTEXT - tokens(content)
    over = server.post({"messages": [{"role": "user", "content": content}], "max_tokens": NEW})
    assert over.status_code == 400 and "exceeds the context limit" in over.json()["error"]["message"]


SERVE_SCRIPT = """
import sys, time
from longdoc import serve
from longdoc.config import GenerationConfig, RunConfig
from longdoc.engine import decode
from longdoc.runtime.local import LocalBackend
from longdoc.render import Reporter

real = decode.decode_one_token
def slow(*args, **kw):  # a generation that would run for a minute
    time.sleep(0.05)
    return real(*args, **kw)
decode.decode_one_token = slow
cfg = RunConfig(model=sys.argv[1], dtype="float32", generation=GenerationConfig(max_new_tokens=8))
session = LocalBackend(cfg, Reporter())
try:
    serve.serve(session, port=0)
except KeyboardInterrupt:
    print("interrupted", file=sys.stderr, flush=True)
    sys.exit(130)
"""


def test_ctrl_c_cancels_generations_and_raises_keyboardinterrupt(session, tmp_path):
    """``serve`` in a process of its own: Ctrl-C with a stream in flight ends the stream with an error
    event, stops the generation and leaves ``serve`` by KeyboardInterrupt (the CLI's exit 130)."""
    import signal
    import sys

    proc, url = spawn_server([sys.executable, "-c", SERVE_SCRIPT, str(session.info.folder)])
    try:
        assert proc.stderr is not None
        body = {"messages": [USER], "max_tokens": 1200, "stream": True}
        with httpx.stream("POST", f"{url}/chat/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            next(line for line in lines if '"content"' in line and '"role"' not in line)  # decoding is under way
            proc.send_signal(signal.SIGINT)
            events = list(serve.iter_sse(line for line in lines if line))
        assert "shutting down" in events[-1]["error"]["message"]
        assert proc.wait(60) == 130
        rest = proc.stderr.read()
        assert "interrupted" in rest and "Traceback" not in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_concurrency_two_runs_two_generations_at_once(server, gate):
    """The module's server has two slots: two held requests run side by side (a third would wait)."""
    results: list[Any] = []
    threads = [
        threading.Thread(target=lambda: results.append(server.post({"messages": [USER], "max_tokens": 3})))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    end = time.monotonic() + 30
    while (server.scheduler.running, server.scheduler.admitted) != (2, 3) and time.monotonic() < end:
        time.sleep(0.01)
    assert (server.scheduler.running, server.scheduler.admitted) == (2, 3)
    gate.set()
    for t in threads:
        t.join(30)
    assert [r.status_code for r in results] == [200, 200, 200]
    assert server.idle()


def test_client_leaving_during_prefill_stops_it_before_the_cache_is_written(server, monkeypatch):
    from longdoc.runtime import doccache, local

    entered, gate = threading.Event(), threading.Event()
    real = local.prefill

    def gated(*args: Any, **kw: Any) -> Any:
        entered.set()
        assert gate.wait(30), "the gate was never opened"
        return real(*args, **kw)

    monkeypatch.setattr(local, "prefill", gated)
    before = dict(server.scheduler.stats)
    messages, chars = ask_messages("What is the TTL?")  # a prefix long enough to be cached once prefilled
    body = {"messages": messages, "max_tokens": NEW, "stream": True, "longdoc_prefix_chars": chars}
    try:
        with httpx.stream(
            "POST", f"{server.url}/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
        ) as response:
            lines = response.iter_lines()
            next(line for line in lines if line.startswith("data:"))
            if not entered.wait(30):
                scheduler = server.scheduler
                stream = next(lines, "") if scheduler.stats != before else "(still open)"
                pytest.fail(
                    f"the request never reached its prefill: running {scheduler.running},"
                    f" admitted {scheduler.admitted}, stats {before} -> {scheduler.stats}; the stream: {stream}"
                )
        end = time.monotonic() + 30
        while not all(job.cancel.is_set() for job in list(server.scheduler.jobs)) and time.monotonic() < end:
            time.sleep(0.01)
        noticed = [job.cancel.is_set() for job in list(server.scheduler.jobs)]
    finally:
        gate.set()
    assert noticed == [True], f"the server did not notice the client leave: {noticed}"
    assert server.idle()
    assert server.scheduler.stats["cancelled"] == before["cancelled"] + 1, (before, server.scheduler.stats)
    assert doccache.entries() == []  # stopped within the prefix's prefill: nothing half-done was saved


def test_keepalive_comments_while_nothing_is_generated(server, session, gate, monkeypatch):
    monkeypatch.setattr("longdoc.serve.limits.STREAM_KEEPALIVE_S", 0.05)
    body = {"messages": [USER], "max_tokens": 3, "stream": True}
    with httpx.stream(
        "POST", f"{server.url}/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
    ) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith(":")) == ": keep-alive"  # decoding is held
        gate.set()
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    gate.clear()  # the openai client reads past the comments
    threading.Timer(0.3, gate.set).start()
    client = server.client()
    chunks = client.chat.completions.create(model=session.info.name, messages=[USER], max_tokens=3, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == server.post({"messages": [USER], "max_tokens": 3}).json()["choices"][0]["message"]["content"]

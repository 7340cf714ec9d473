"""The OpenAI wire format as ``longdoc serve`` speaks it: a chat-completions body checked into a
``ChatRequest``, and the bodies of answers, stream chunks and errors (with the ``longdoc`` extension
field) built from typed values. Nothing here knows the model, the scheduler or the web framework.

Request fields outside the subset longdoc implements are ignored, except those whose silent omission
would change the answer's meaning (``NEUTRAL``): those are refused unless they ask for the default.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from longdoc.serve.outcome import JsonObject, Outcome

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# Temperatures below this are greedy (vLLM's rule; 1e-39 would overflow the logits), above MAX refused.
MIN_TEMPERATURE = 1e-5
MAX_TEMPERATURE = 2.0
SEED_RANGE = (-(2**63), 2**63 - 1)  # OpenAI's seed is a 64-bit integer
# Fields refused unless they ask for what longdoc does anyway: ignoring them would change the answer.
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "response_format": ({"type": "text"},),
    "logit_bias": ({},),
    "tool_choice": ("none", "auto"),  # with no tools, "auto" calls none
    "tools": ([],),
    "functions": ([],),
    "function_call": ("none", "auto"),
    "presence_penalty": (0,),
    "frequency_penalty": (0,),
    "logprobs": (False,),
    "top_logprobs": (0,),
    "stop": ([], ""),
}


class ApiError(Exception):
    """An error answered with an OpenAI-style body: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code
        self.param = param

    def body(self) -> JsonObject:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


def one_line(exc: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__


def internal_error(exc: BaseException) -> ApiError:
    """What a client is told of a bug: one line, never a traceback."""
    return ApiError(500, f"internal error: {one_line(exc)}", "server_error")


# --------------------------------------------------------------------------------------------------
# requests


@dataclass(frozen=True)
class Message:
    """A chat message: its role (``developer`` read as ``system``) and its text."""

    role: str
    content: str


@dataclass(frozen=True)
class Sampling:
    """What a request asks of the generation; None leaves the server's default."""

    max_tokens: int | None = None
    temperature: float | None = None  # 0 is greedy (so is anything below MIN_TEMPERATURE)
    top_p: float | None = None
    seed: int | None = None


@dataclass(frozen=True)
class StreamOptions:
    """A streamed answer's options: whether a last chunk carries the usage."""

    include_usage: bool = False


@dataclass(frozen=True)
class ChatRequest:
    """A validated chat-completions request."""

    messages: tuple[Message, ...]
    model: str | None = None
    sampling: Sampling = Sampling()
    stream: StreamOptions | None = None  # None: one JSON answer; else server-sent events
    #: ``longdoc_prefix_chars``: the characters of the last user message that are its document part
    prefix_chars: int | None = None

    @property
    def chars(self) -> int:
        return sum(len(m.content) for m in self.messages)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _shown(value: object) -> str:
    return json.dumps(value)[:40]


def _number(body: JsonObject, name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_number(value) or not math.isfinite(value):
        raise bad_request(f"'{name}' must be a number, not {_shown(value)}", name)
    return float(value)


def _integer(body: JsonObject, name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise bad_request(f"'{name}' must be an integer, not {_shown(value)}", name)
    return int(value)


def _content(message: JsonObject, i: int) -> str:
    """A message's text: a string, or a list of text parts (joined with newlines, as vLLM does)."""
    content = message.get("content")
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_request(f"messages[{i}].content: only text parts are supported", "messages")
            texts.append(part["text"])
        content = "\n".join(texts)
    if not isinstance(content, str):
        raise bad_request(f"messages[{i}].content must be a string or a list of text parts", "messages")
    if not content.strip():
        raise bad_request(f"messages[{i}].content is empty", "messages")
    return content


def _messages(body: JsonObject) -> tuple[Message, ...]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list of {role, content} objects", "messages")
    parsed = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad_request(f"messages[{i}] must be an object with 'role' and 'content'", "messages")
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:  # a list or an object is no key of ROLES
            shown = _shown(role) if role is not None else "missing"
            raise bad_request(f"messages[{i}].role {shown} is not one of system, user, assistant", "messages")
        parsed.append(Message(ROLES[role], _content(message, i)))
    if parsed[-1].role != "user":
        raise bad_request("the last message must be the user's", "messages")
    return tuple(parsed)


def _sampling(body: JsonObject) -> Sampling:
    max_tokens = _integer(body, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens")
    if max_tokens is not None and max_tokens < 1:
        raise bad_request(f"'max_tokens' must be at least 1, not {max_tokens}", "max_tokens")
    temperature = _number(body, "temperature")
    if temperature is not None and not 0 <= temperature <= MAX_TEMPERATURE:
        raise bad_request(
            f"'temperature' must be between 0 (greedy) and {MAX_TEMPERATURE:g}, not {temperature:g}", "temperature"
        )
    if temperature is not None and temperature < MIN_TEMPERATURE:
        temperature = 0.0  # greedy: dividing the logits by 1e-39 would overflow them
    top_p = _number(body, "top_p")
    if top_p is not None and not 0 < top_p <= 1:
        raise bad_request(f"'top_p' must be above 0 and at most 1, not {top_p:g}", "top_p")
    seed = _integer(body, "seed")
    if seed is not None and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise bad_request("'seed' must be a 64-bit integer", "seed")
    return Sampling(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)


def _stream(body: JsonObject) -> StreamOptions | None:
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad_request("'stream' must be true or false", "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_request("'stream_options' must be an object", "stream_options")
    include_usage = (options or {}).get("include_usage")
    if include_usage is not None and not isinstance(include_usage, bool):
        raise bad_request("'stream_options.include_usage' must be true or false", "stream_options")
    return StreamOptions(include_usage=bool(include_usage)) if stream else None


def _neutral(value: object, allowed: tuple[Any, ...]) -> bool:
    """Whether a field's value asks for nothing longdoc would ignore (None, or one of ``allowed``)."""
    if value is None:
        return True
    if isinstance(value, bool) and not any(isinstance(a, bool) for a in allowed):
        return False  # JSON true is not the number 1, nor false 0
    return any(type(value) is type(a) or (_is_number(value) and _is_number(a)) for a in allowed if value == a)


def _refuse_unsupported(body: JsonObject) -> None:
    n = _integer(body, "n")
    if n is not None and n != 1:
        raise bad_request("only n=1 is supported", "n")
    if not _neutral(body.get("stop"), NEUTRAL["stop"]):
        raise bad_request("stop sequences are not supported by longdoc serve", "stop")
    for name, allowed in NEUTRAL.items():
        if not _neutral(body.get(name), allowed):
            raise bad_request(f"'{name}' is not supported by longdoc serve (only its default)", name)


def parse_request(body: object) -> ChatRequest:
    """Check a chat-completions body; raises ApiError(400) with a one-line message for what is wrong."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    messages = _messages(body)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad_request("'model' must be a string", "model")
    sampling = _sampling(body)
    stream = _stream(body)
    _refuse_unsupported(body)
    prefix_chars = _integer(body, "longdoc_prefix_chars")
    last = messages[-1].content
    if prefix_chars is not None and not 0 <= prefix_chars <= len(last):
        raise bad_request(
            f"'longdoc_prefix_chars' must be between 0 and the last message's length ({len(last)}), not {prefix_chars}",
            "longdoc_prefix_chars",
        )
    return ChatRequest(messages=messages, model=model, sampling=sampling, stream=stream, prefix_chars=prefix_chars)


def parse_json(raw: bytes) -> object:
    """A request body's JSON, or ApiError(400) saying in one line why it is none."""
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise bad_request(f"the request body is not valid JSON ({str(exc).splitlines()[0][:120]})") from None
    except RecursionError:
        raise bad_request("the request body is not valid JSON (nested too deeply)") from None


# --------------------------------------------------------------------------------------------------
# answers


@dataclass(frozen=True)
class Reply:
    """What every body of one answer repeats: its id, when it was made, and the served model's name."""

    id: str
    created: int
    model: str


def usage_body(outcome: Outcome) -> dict[str, int]:
    prompt, completion = outcome.prompt_tokens, outcome.generated_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def longdoc_extension(outcome: Outcome, report_cache: bool = True) -> JsonObject:
    """What longdoc adds to a response (a field OpenAI clients keep and ignore): cache, timings, DCA,
    recycling. Without ``report_cache`` the cache says only how long the document prefix was, not
    whether it was found (which would tell a client what another one sent)."""
    out = dict(outcome.sections)
    if not report_cache and "cache" in out:
        out["cache"] = {"prefix_tokens": outcome.prefix_tokens}
    return out


def completion_body(reply: Reply, outcome: Outcome, report_cache: bool) -> JsonObject:
    """A whole (non-streamed) answer."""
    return {
        "id": reply.id,
        "object": "chat.completion",
        "created": reply.created,
        "model": reply.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": outcome.answer},
                "logprobs": None,
                "finish_reason": outcome.finish_reason,
            }
        ],
        "usage": usage_body(outcome),
        "longdoc": longdoc_extension(outcome, report_cache),
    }


def chunk_body(
    reply: Reply,
    options: StreamOptions,
    delta: dict[str, str],
    finish_reason: str | None = None,
    extension: JsonObject | None = None,
) -> JsonObject:
    """One chunk of a streamed answer: a piece of text (``delta``), or with ``finish_reason`` its end."""
    out: JsonObject = {
        "id": reply.id,
        "object": "chat.completion.chunk",
        "created": reply.created,
        "model": reply.model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }
    if options.include_usage:
        out["usage"] = None
    if extension is not None:
        out["longdoc"] = extension
    return out


def usage_chunk_body(reply: Reply, outcome: Outcome) -> JsonObject:
    """The last chunk of a stream that asked for ``include_usage``: no choices, the usage."""
    return {
        "id": reply.id,
        "object": "chat.completion.chunk",
        "created": reply.created,
        "model": reply.model,
        "choices": [],
        "usage": usage_body(outcome),
    }


def model_card(name: str, created: int, context_length: int) -> JsonObject:
    """The served model as /v1/models lists it, with its context length as vLLM (``max_model_len``)
    and llama.cpp (``context_length``) give it."""
    return {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "longdoc",
        "max_model_len": context_length,
        "context_length": context_length,
    }

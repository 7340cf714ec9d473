"""Helpers of the tests that run ``longdoc serve`` (test_serve, test_serve_security, test_remote): a server
on a loopback port in a thread or a process, a client for it, and the local answer to compare with. Their
fixtures (``session``, ``gate``, ``tiny_chat``) are in conftest.py.

Apart from helpers.py so that what imports that (subprocess scripts, the tools) does not load the
server, fastapi and the OpenAI client.
"""

from __future__ import annotations

import copy
import json
import subprocess
import threading
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

# fastapi, uvicorn, openai and httpx come with the dev extra: a missing one fails here, never skips
import httpx
import openai

from longdoc import serve
from longdoc.ingest import Document
from longdoc.prompt import ask_prompt, format_documents, template
from longdoc.render import Reporter

from .helpers import REPO

if TYPE_CHECKING:
    from longdoc.config import RunConfig
    from longdoc.runtime.local import LocalBackend

KEY = "test-key"
NEW = 8  # the server's default answer budget, and every request's here
MAX_CONTEXT = 3000
DOC = Document(
    source="heron.txt",
    kind="text",
    segments=[
        ("", "The Heron pump moved 40 litres per minute at 3 bar. " * 12),
        ("", "Its service port is 8081; the cache TTL is 300 seconds. " * 12),
    ],
)
USER = {"role": "user", "content": "Hello there"}


class Collect(Reporter):
    """A quiet reporter that keeps the status lines (the server's 'serving ...' line among them)."""

    def __init__(self) -> None:
        super().__init__(quiet=True)
        self.lines: list[str] = []

    def status(self, message: str) -> None:
        self.lines.append(message)


class Served:
    def __init__(self, running: serve.Running, thread: threading.Thread):
        self.running = running
        self.thread = thread
        self.url = running.url
        self.scheduler: serve.Scheduler = running.app.state.scheduler

    def client(self, key: str | None = KEY, **kw: Any) -> Any:
        return openai.OpenAI(base_url=self.url, api_key=key or "none", max_retries=0, timeout=60, **kw)

    def post(self, body: Any, key: str | None = KEY, timeout: float = 60, **headers: str) -> Any:
        headers = {"Content-Type": "application/json", **headers}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        data = {"content": body} if isinstance(body, bytes | str) else {"content": json.dumps(body)}
        return httpx.post(f"{self.url}/chat/completions", headers=headers, timeout=timeout, **data)

    def health(self) -> dict[str, Any]:
        return dict(httpx.get(self.url.removesuffix("/v1") + "/health", timeout=10).json())

    def idle(self, timeout: float = 30.0) -> bool:
        """Wait until no request is running or waiting."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.scheduler.admitted == 0 and self.scheduler.running == 0:
                return True
            time.sleep(0.02)
        return False


def start(session: LocalBackend, **kw: Any) -> Served:
    """``serve.serve`` on a free loopback port in a thread; returns once /health answers."""
    box: dict[str, serve.Running] = {}
    up = threading.Event()

    def ready(running: serve.Running) -> None:
        box["running"] = running
        up.set()

    thread = threading.Thread(
        target=serve.serve, args=(session,), kwargs={"port": 0, "api_key": KEY, "ready": ready, **kw}, daemon=True
    )
    thread.start()
    assert up.wait(60), "the server did not start"
    served = Served(box["running"], thread)
    assert httpx.get(served.url.removesuffix("/v1") + "/health", timeout=10).json()["status"] == "ok"
    return served


def stop(served: Served) -> None:
    served.running.stop()
    served.thread.join(30)
    assert not served.thread.is_alive(), "the server did not stop"


def spawn_server(cmd: list[str]) -> tuple[Any, str]:
    """A server process started by ``cmd``, once it says where it serves: (process, its /v1 URL)."""
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stderr is not None
    line = ""
    while "serving" not in line:
        line = proc.stderr.readline()
        if not line:
            proc.kill()
            raise AssertionError("the server did not start")
    return proc, line.split(" on ")[1].strip()


def ask_messages(question: str, docs: list[Document] = [DOC]) -> tuple[list[dict[str, str]], int]:  # noqa: B006
    """The messages of longdoc's own ask prompt, and the characters of its document part."""
    documents = format_documents(docs)
    user = template("ask").format(documents=documents, question=question).strip()
    system = template("system").strip()
    return [{"role": "system", "content": system}, {"role": "user", "content": user}], user.index(documents) + len(
        documents
    )


def answer_locally(session: LocalBackend, question: str, **generation: Any) -> dict[str, Any]:
    """The local pipeline's answer to the ask prompt (the same settings as the server's)."""
    cfg = replace(session.cfg, generation=replace(session.cfg.generation, **generation))
    return replace_cfg(session, cfg).run(ask_prompt(session.tokenizer, [DOC], question), []).to_json()


def replace_cfg(session: LocalBackend, cfg: RunConfig) -> LocalBackend:
    other = copy.copy(session)
    other.cfg = cfg
    return other

"""``longdoc serve``: an OpenAI-compatible HTTP server over the local model.

Each request runs through ``local.Conversation``, so DCA, recycled decoding and the document KV cache
apply as they do locally; two requests about the same long document share its prefix's token ids,
and so its cache entry (``prompting``). The rooms, in the order a request meets them:

* ``app``: the web app (routes, the checks before admission, errors as OpenAI bodies);
* ``limits``: what a request may cost before it is admitted (body cap, read deadlines, Host names);
* ``protocol``: the OpenAI wire format (``ChatRequest`` in, response and chunk bodies out);
* ``prompting``: chat messages as a prompt with a document prefix;
* ``scheduler``: slots, the queue, the worker threads that run generations, cancellation;
* ``outcome``: a finished run as the response tells it (the one reader of the run result);
* ``streaming``: server-sent events, and the streamed text cut as the whole answer is;
* ``documents``: served requests' own document cache, keys salted per API key;
* ``server``: uvicorn, started and stopped (``serve``).

FastAPI and uvicorn are an optional extra (``pip install 'longdoc[serve]'``); importing this package
does not import them, nor torch: ``create_app`` imports ``app`` on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from longdoc.serve.prompting import chat_prompt
from longdoc.serve.protocol import ApiError, ChatRequest, Message, parse_request
from longdoc.serve.scheduler import Job, Scheduler
from longdoc.serve.server import Running, check_installed, serve
from longdoc.serve.streaming import VisibleText, iter_sse

if TYPE_CHECKING:
    from longdoc.serve.app import create_app

__all__ = [
    "ApiError",
    "ChatRequest",
    "Job",
    "Message",
    "Running",
    "Scheduler",
    "VisibleText",
    "chat_prompt",
    "check_installed",
    "create_app",
    "iter_sse",
    "parse_request",
    "serve",
]


def __getattr__(name: str) -> Any:
    """``create_app``, imported with FastAPI only when asked for (a usage error without the extra)."""
    if name == "create_app":
        check_installed()
        from longdoc.serve.app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

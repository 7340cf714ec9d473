"""The result of a run: what every backend returns and every task passes on, and the JSON it prints
(DESIGN.md section 2).

One type for every way a run ends: a local answer, an answer through ``--endpoint``, a map-reduce
summary (``Result.merge`` of its steps), and a run stopped before it produced anything
(``Result.empty``, or the bare ``Result`` of a Ctrl-C before the model was known). ``to_json`` is the
only place the JSON is written: a section that does not apply to a result (no ``plan`` for an answer,
no ``usage`` for a local run) is left out, as the fields marked ``OMIT`` say.
"""

from __future__ import annotations

import dataclasses
import resource
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from longdoc.ingest import Document
from longdoc.render import human_bytes

if TYPE_CHECKING:  # this module is imported by the CLI before torch is needed
    from longdoc.engine.recycled import RecycleStats

# A field whose None means "does not apply": left out of the JSON rather than written as null.
OMIT = {"omit": True}


def omitted() -> Any:
    return field(default=None, metadata=OMIT)


def json_of(obj: object) -> Any:
    """A result part as JSON: dataclasses field by field (``OMIT`` fields left out when None),
    lists item by item; anything else as it is."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {
            f.name: json_of(getattr(obj, f.name))
            for f in dataclasses.fields(obj)
            if not (f.metadata.get("omit") and getattr(obj, f.name) is None)
        }
    if isinstance(obj, (list, tuple)):
        return [json_of(x) for x in obj]
    return obj


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass(frozen=True)
class Source:
    """One input as the prompt holds it."""

    path: str
    kind: str
    pages: int | None
    tokens: int


def sources_of(docs: Sequence[Document], count: Callable[[str], int]) -> list[Source]:
    """Each input as the result lists it, with its tokens by ``count``."""
    return [Source(path=d.source, kind=d.kind, pages=d.pages, tokens=count(d.text)) for d in docs]


@dataclass(frozen=True)
class LocalEngine:
    """The model runs in this process: what it runs on, and what this machine gets (``runtime.machine``)."""

    model: str
    device: str
    dtype: str
    cpu: str
    isa_cap: str | None
    packed: bool
    quantize: str
    attention: str
    kind: str = "local"


@dataclass(frozen=True)
class RemoteEngine:
    """The model runs on an OpenAI-compatible server (``--endpoint``)."""

    url: str
    model: str
    context_length: int
    tokenizer: str
    kind: str = "remote"


@dataclass
class Timings:
    load_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    prefill_tok_s: float = 0.0
    decode_tok_s: float = 0.0
    ttft_s: float = 0.0
    #: a prompt whose documents were prefilled with it: the documents' share of ``prefill_s``
    prefix_prefill_s: float | None = omitted()
    #: through --endpoint: the whole request, as the client saw it
    request_s: float | None = omitted()
    #: reading the inputs (the CLI's ask and summarize)
    ingest_s: float | None = omitted()


@dataclass
class Memory:
    peak_rss_bytes: int = 0
    kv_cache_bytes: int = 0
    gpu_peak_bytes: int | None = None


@dataclass(frozen=True)
class Dca:
    enabled: bool = False
    chunk_size: int = 0
    local_window: int = 0
    logit_scale: float = 1.0
    #: False through --endpoint (the server's attention is its own)
    applicable: bool | None = omitted()


@dataclass(frozen=True)
class Recycle:
    """Recycled decoding: whether it ran, and what it did (``engine.recycled.RecycleStats``)."""

    enabled: bool = False
    k: int = 0
    effective_k: int = 0
    stride: int = 0
    schedule: str = "none"
    threshold: float = 0.0
    full_steps: int = 0
    recycled_steps: int = 0
    layer_refreshes: int = 0
    applicable: bool | None = omitted()

    @classmethod
    def of(cls, stats: RecycleStats | None) -> Recycle:
        """The entry of a decode with recycling (its stats), or without (None)."""
        if stats is None:
            return cls()
        return cls(enabled=True, **dataclasses.asdict(stats))


@dataclass(frozen=True)
class Prefill:
    """Exact or sparse prefill, and the share of exact attention's (query, key) pairs it attended to."""

    mode: str | None = "exact"
    budget: int | None = None
    kept_fraction: float | None = 1.0
    applicable: bool | None = omitted()


@dataclass(frozen=True)
class Cache:
    """The document cache: whether the documents' prefix came from it (or from memory), and its entry."""

    hit: bool = False
    bytes: int | None = omitted()
    load_s: float | None = omitted()
    key: str | None = omitted()
    save_s: float | None = omitted()
    in_memory: bool | None = omitted()
    prefix_tokens: int | None = omitted()


@dataclass(frozen=True)
class Usage:
    """What an OpenAI-compatible server counted."""

    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class SummaryPlan:
    """How a summary was made: one pass, or map-reduce over pieces in levels of steps."""

    mode: str
    pieces: int
    levels: int
    steps: int | None = omitted()


@dataclass(frozen=True)
class Citation:
    """A page (``page``) or file-line (``path``, ``line``, ``end_line``) citation found in an answer."""

    source: str
    page: int | None = omitted()
    path: str | None = omitted()
    line: int | None = omitted()
    end_line: int | None = omitted()
    #: a page that several PDFs have, none named: every one of them
    candidates: list[str] | None = omitted()


# The sections a run through --endpoint reports as not applicable (the server's own figures are in ``server``).
REMOTE_DCA = Dca(applicable=False)
REMOTE_RECYCLE = Recycle(applicable=False)
REMOTE_PREFILL = Prefill(mode=None, budget=None, kept_fraction=None, applicable=False)


@dataclass
class Result:
    """One run's answer and its figures. Sections are None where nothing ran that would fill them."""

    answer: str
    model: str | None
    engine: LocalEngine | RemoteEngine | None = omitted()
    quantize: str | None = omitted()
    prompt_tokens: int = 0
    generated_tokens: int = 0
    sources: list[Source] = field(default_factory=list)
    timings: Timings | None = omitted()
    memory: Memory | None = omitted()
    dca: Dca | None = omitted()
    recycle: Recycle | None = omitted()
    prefill: Prefill | None = omitted()
    cache: Cache | None = omitted()
    #: through --endpoint: the server's counts (null when it sent none) and longdoc serve's own figures
    usage: Usage | None = omitted()
    server: dict[str, object] | None = omitted()
    plan: SummaryPlan | None = omitted()
    question: str | None = omitted()
    turn: int | None = omitted()
    citations: list[Citation] | None = omitted()
    interrupted: bool | None = omitted()
    #: a run stopped before it had a result: where (start, ingest, load, generate)
    stage: str | None = omitted()

    @property
    def remote(self) -> bool:
        return isinstance(self.engine, RemoteEngine)

    def stats_line(self) -> str:
        """The run's figures in one line for a person: timings, memory and what ran."""
        t, m = self.timings or Timings(), self.memory or Memory()
        if isinstance(self.engine, RemoteEngine):  # what the client saw, and the server's cache if it says
            counts = "the server's usage" if self.usage else "local estimates"
            parts = [
                f"{self.engine.model} at {self.engine.url}",
                f"prompt {self.prompt_tokens:,} tok",
                f"ttft {t.ttft_s:.1f}s",
                f"decode {self.generated_tokens} tok at {t.decode_tok_s:.1f} tok/s",
                f"counts from {counts}",
            ]
            cache = (self.server or {}).get("cache")
            if isinstance(cache, dict) and cache.get("hit"):
                parts.append(f"{cache.get('prefix_tokens', 0):,} prefix tok from the server's document cache")
            return " · ".join(parts)
        cache = self.cache or Cache()
        if cache.hit:
            where = "memory" if cache.in_memory else f"the document cache in {cache.load_s or 0:.2f}s"
            prefill = f"prefill {self.prompt_tokens:,} tok ({cache.prefix_tokens or 0:,} from {where})"
        else:
            prefill = f"prefill {self.prompt_tokens:,} tok at {t.prefill_tok_s:,.0f} tok/s"
        parts = [
            f"load {t.load_s:.1f}s",
            prefill,
            f"decode {self.generated_tokens} tok at {t.decode_tok_s:.1f} tok/s",
            f"ttft {t.ttft_s:.1f}s",
            f"peak RSS {human_bytes(m.peak_rss_bytes)}",
            f"KV {human_bytes(m.kv_cache_bytes)}",
        ]
        if m.gpu_peak_bytes is not None:
            parts.append(f"GPU peak {human_bytes(m.gpu_peak_bytes)}")
        if self.dca and self.dca.enabled:
            parts.append(f"DCA chunk {self.dca.chunk_size}")
        if self.prefill and self.prefill.mode == "sparse":
            parts.append(f"sparse prefill (kept {self.prefill.kept_fraction or 0:.0%} of attention pairs)")
        if self.recycle and self.recycle.enabled:
            r = self.recycle
            parts.append(
                f"recycle k={r.effective_k} {r.schedule}/{r.stride} "
                f"({r.full_steps} full / {r.recycled_steps} recycled steps)"
            )
        return " · ".join(parts)

    def to_json(self) -> dict[str, Any]:
        out = json_of(self)
        if self.remote and self.usage is None:
            out["usage"] = None  # said, not left out: the server sent no counts
        return out

    @classmethod
    def empty(
        cls,
        model: str,
        engine: LocalEngine | RemoteEngine,
        sources: list[Source],
        load_s: float = 0.0,
        quantize: str | None = None,
    ) -> Result:
        """A result with every section and nothing run (a run interrupted before its first step)."""
        return cls(
            answer="",
            model=model,
            engine=engine,
            quantize=quantize,
            sources=sources,
            timings=Timings(load_s=round(load_s, 3)),
            memory=Memory(peak_rss_bytes=peak_rss_bytes()),
            dca=Dca(),
            recycle=Recycle(),
            cache=Cache(),
        )

    @classmethod
    def merge(cls, steps: Sequence[Result], answer: str) -> Result:
        """The result of a run of several steps (map-reduce): the last step's, with ``answer``, counts
        and timings summed over every step, and a feature counted as on where any step had it."""
        final = steps[-1]
        times = [s.timings or Timings() for s in steps]
        prefill_s = sum(t.prefill_s for t in times)
        decode_s = sum(t.decode_s for t in times)
        prompt_tokens = sum(s.prompt_tokens for s in steps)
        decoded_after_first = sum(max(0, s.generated_tokens - 1) for s in steps)
        before_final = sum(t.prefill_s + t.decode_s for t in times[:-1])
        last = times[-1]
        timings = dataclasses.replace(
            last,
            prefill_s=round(prefill_s, 3),
            decode_s=round(decode_s, 3),
            prefill_tok_s=round(prompt_tokens / prefill_s, 1) if prefill_s else 0.0,
            decode_tok_s=round(decoded_after_first / decode_s, 2) if decode_s else 0.0,
            ttft_s=round(before_final + last.ttft_s, 3),
        )
        memory = final.memory and dataclasses.replace(
            final.memory, kv_cache_bytes=max((s.memory.kv_cache_bytes for s in steps if s.memory), default=0)
        )
        dca = final.dca and dataclasses.replace(final.dca, enabled=any(s.dca and s.dca.enabled for s in steps))
        recycles = [s.recycle for s in steps if s.recycle is not None]
        recycle = final.recycle and dataclasses.replace(
            final.recycle,
            enabled=any(r.enabled for r in recycles),
            full_steps=sum(r.full_steps for r in recycles),
            recycled_steps=sum(r.recycled_steps for r in recycles),
            layer_refreshes=sum(r.layer_refreshes for r in recycles),
        )
        usages = [s.usage for s in steps]
        usage = None
        if all(u is not None for u in usages):  # through --endpoint: what the server counted, over all steps
            usage = Usage(
                prompt_tokens=sum(u.prompt_tokens for u in usages if u),
                completion_tokens=sum(u.completion_tokens for u in usages if u),
            )
        return dataclasses.replace(
            final,
            answer=answer,
            prompt_tokens=prompt_tokens,
            generated_tokens=sum(s.generated_tokens for s in steps),
            timings=timings,
            memory=memory,
            dca=dca,
            recycle=recycle,
            usage=usage,
        )

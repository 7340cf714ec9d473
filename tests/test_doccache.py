"""The document KV cache: hits reproduce cold runs, damage is rebuilt, keys change with what the values
depend on, concurrent writers leave one valid entry, and the CLI's ask/chat/cache commands."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from longdoc.config import DCAConfig, GenerationConfig, RecycleConfig, RunConfig
from longdoc.engine.kvcache import KVCache
from longdoc.ingest import ingest_paths
from longdoc.prompt import ask_prompt
from longdoc.render import Reporter
from longdoc.runtime import doccache
from longdoc.runtime.backend import PromptTokens
from longdoc.runtime.local import LocalBackend
from longdoc.runtime.result import Result
from longdoc.store import documents_dir

from .helpers import REPO, random_store, save_tiny_qwen2

SAMPLES = REPO / "sample_docs"


def config(folder: str, *, dca: bool = True, chunk: int = 96, recycle: bool = True, new: int = 12) -> RunConfig:
    """Float32, DCA with many chunks of 96 tokens, recycled decoding with a set much smaller than the
    context: every path a cached prefix feeds."""
    return RunConfig(
        model=folder,
        dtype="float32",
        max_context=4096,
        dca=DCAConfig(enabled=dca, chunk_size=chunk if dca else None, local_window=16 if dca else None),
        recycle=RecycleConfig(enabled=recycle, k=64, stride=4),
        generation=GenerationConfig(max_new_tokens=new),
    )


def ask(cfg: RunConfig, question: str = "What is the TTL?") -> dict:
    session = LocalBackend(cfg, Reporter(quiet=True))
    docs = ingest_paths([str(SAMPLES / "report.pdf")])
    prompt = ask_prompt(session.tokenizer, docs, question)
    return session.run(prompt, [], on_text=None).to_json()


@pytest.mark.parametrize("dca,recycle", [(True, True), (True, False), (False, True)])
def test_hit_gives_the_cold_runs_tokens(tiny, dca, recycle):
    cfg = config(tiny, dca=dca, recycle=recycle)
    uncached = ask(replace(cfg, doc_cache=False))
    cold = ask(cfg)
    warm = ask(cfg)
    assert uncached["cache"]["hit"] is False and uncached["cache"]["bytes"] == 0
    assert cold["cache"]["hit"] is False and cold["cache"]["bytes"] > 0
    assert warm["cache"]["hit"] is True and warm["cache"]["bytes"] == cold["cache"]["bytes"]
    assert "prefix_prefill_s" in cold["timings"] and "prefix_prefill_s" not in warm["timings"]
    assert warm["generated_tokens"] == cold["generated_tokens"] == uncached["generated_tokens"] > 0
    assert warm["answer"] == cold["answer"] == uncached["answer"]
    assert warm["prompt_tokens"] == cold["prompt_tokens"]


def test_other_question_reuses_the_prefix(tiny):
    cfg = config(tiny)
    first = ask(cfg, "What is the TTL?")
    second = ask(cfg, "Which port does the service use, and why?")
    assert first["cache"]["hit"] is False and second["cache"]["hit"] is True
    assert first["cache"]["prefix_tokens"] == second["cache"]["prefix_tokens"] >= doccache.MIN_PREFIX_TOKENS
    assert second["prompt_tokens"] > first["prompt_tokens"]


def entry_files() -> list[Path]:
    return sorted(documents_dir().glob("*" + doccache.SUFFIX))


@pytest.mark.parametrize("damage", ["truncate", "flip", "ids"])
def test_damaged_entry_is_reported_and_rebuilt(tiny, damage, capsys):
    cfg = config(tiny, recycle=False)
    cold = ask(cfg)
    (path,) = entry_files()
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[-100] ^= 0x40  # in the last layer's values: only the checksum can tell
    else:  # a valid file whose ids are not the prompt's (a stale or foreign entry under this name)
        header_len = int.from_bytes(data[:8], "little")
        data[8 + header_len] ^= 0x01
    path.write_bytes(bytes(data))
    session = LocalBackend(cfg, Reporter())
    docs = ingest_paths([str(SAMPLES / "report.pdf")])
    rebuilt = session.run(ask_prompt(session.tokenizer, docs, "What is the TTL?"), []).to_json()
    err = capsys.readouterr().err
    assert err.count("document cache entry") == 1 and "deleted it, prefilling again" in err
    assert rebuilt["cache"]["hit"] is False and rebuilt["answer"] == cold["answer"]
    warm = ask(cfg)
    assert warm["cache"]["hit"] is True and warm["answer"] == cold["answer"]
    assert [p.name for p in documents_dir().iterdir()] == [path.name]  # nothing of the damaged one is left


def test_key_changes_with_what_the_values_depend_on():
    base = doccache.KeyParts(
        model="sha256:aa",
        dtype="bfloat16",
        device="cpu/avx512/no-amx",
        kernel="attend_cpu",
        layout=(24576, 4096),
        logit_scale=1.0,
        prefill="exact",
        prefill_step=2048,
    )
    ids = list(range(1000))
    key = doccache.entry_key(base, ids)
    assert key == doccache.entry_key(replace(base), list(ids))
    changed = [
        replace(base, model="sha256:ab"),
        replace(base, dtype="float32"),
        replace(base, device="cuda/H100"),
        replace(base, kernel="attend_reference"),
        replace(base, layout=None),
        replace(base, layout=(2048, 256)),
        replace(base, logit_scale=1.1),
        replace(base, prefill="sparse"),
        replace(base, prefill_step=1024),
    ]
    keys = {doccache.entry_key(p, ids) for p in changed}
    assert key not in keys and len(keys) == len(changed)
    assert doccache.entry_key(base, ids[:-1]) != key
    assert doccache.entry_key(base, ids[:-1] + [7]) != key


def test_layout_change_misses(tiny):
    cfg = config(tiny, recycle=False)
    ask(cfg)
    other = ask(replace(cfg, dca=DCAConfig(enabled=True, chunk_size=128, local_window=16)))
    assert other["cache"]["hit"] is False
    assert len(entry_files()) == 2


def test_model_identity_follows_the_weights(tmp_path):
    folder = tmp_path / "m"
    save_tiny_qwen2(folder, window=256, seed=0)
    first = doccache.model_identity(folder)
    assert first == doccache.model_identity(folder)
    save_tiny_qwen2(folder, window=256, seed=1)
    os.utime(folder / "model.safetensors", ns=(1, 1))  # same name, new weights: the stat changes
    assert doccache.model_identity(folder) != first


def test_save_load_round_trip_and_eviction(tmp_path):
    kv, ids = random_store(1000)
    sizes = []
    for n, key in enumerate(["a" * 64, "b" * 64, "c" * 64]):
        sizes.append(doccache.save(key, kv, ids, {"model": "m", "sources": json.dumps([f"doc{n}"])}))
        os.utime(doccache.entry_path(key), (time.time() - 100 + n, time.time() - 100 + n))
    loaded = KVCache(4, 2, 64, 1008, torch.bfloat16, torch.device("cpu"))
    got = doccache.load("a" * 64, loaded, ids)  # a use: now the most recent
    assert got is not None and got.bytes == sizes[0]
    for layer in range(4):
        assert torch.equal(loaded.k[layer][:, :, :1000], kv.k[layer][:, :, :1000])
        assert torch.equal(loaded.v[layer][:, :, :1000], kv.v[layer][:, :, :1000])
    assert [e.sources for e in doccache.entries()] == [["doc0"], ["doc2"], ["doc1"]]
    assert doccache.evict(sizes[0] * 2 + 1, keep="c" * 64) == 1
    assert [e.key[0] for e in doccache.entries()] == ["a", "c"]
    assert doccache.load("b" * 64, loaded, ids) is None
    assert doccache.clear() == (2, sizes[0] * 2)


WRITER = """
from tests.helpers import random_store
from longdoc.runtime import doccache
kv, ids = random_store(6000)
for _ in range(3):
    doccache.save("d" * 64, kv, ids, {"model": "m", "sources": "[]"})
"""


def test_two_processes_writing_one_entry_leave_one_valid_entry(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER], env=env, cwd=REPO) for _ in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    kv, ids = random_store(6000)
    loaded = KVCache(4, 2, 64, 6008, torch.bfloat16, torch.device("cpu"))
    assert doccache.load("d" * 64, loaded, ids) is not None
    assert torch.equal(loaded.k[3][:, :, :6000], kv.k[3][:, :, :6000])
    assert [p.name for p in documents_dir().iterdir()] == ["d" * 64 + doccache.SUFFIX]  # no temp files left


# -- the CLI ------------------------------------------------------------------------------------


def longdoc(*args: str, stdin: str | None = None, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "longdoc", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def json_lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_ask_many_questions_one_prefill(tiny):
    pdf = str(SAMPLES / "report.pdf")
    opts = ("--model", tiny, "--max-new-tokens", "6", "--dtype", "float32")
    run = longdoc("ask", pdf, "-Q", "What is the TTL?", "-Q", "Which port?", *opts, "--json")
    assert run.returncode == 0, run.stderr
    lines = json_lines(run.stdout)
    assert [d["question"] for d in lines] == ["What is the TTL?", "Which port?"]
    assert lines[0]["cache"]["hit"] is False and "prefix_prefill_s" in lines[0]["timings"]
    assert lines[1]["cache"] == {**lines[0]["cache"], "hit": True, "load_s": 0.0, "in_memory": True}
    assert "prefix_prefill_s" not in lines[1]["timings"]
    # a later run: from the document cache; questions from a file, plain text with a header each
    questions = Path(tiny).parent / "questions.txt"
    questions.write_text("What is the TTL?\n\n  Which port?  \n")
    text = longdoc("ask", pdf, "--questions", str(questions), *opts)
    assert text.returncode == 0, text.stderr
    assert text.stdout.startswith("Q: What is the TTL?\n") and "\nQ: Which port?\n" in text.stdout
    assert "from the document cache" in text.stderr
    again = longdoc("ask", pdf, "What is the TTL?", *opts, "--json")
    (warm,) = json_lines(again.stdout)
    assert warm["cache"]["hit"] is True and warm["answer"] == lines[0]["answer"]
    none = longdoc("ask", pdf, "What is the TTL?", *opts, "--json", "--no-cache")
    assert json_lines(none.stdout)[0]["cache"]["hit"] is False


@pytest.mark.parametrize(
    "args,fragment",
    [
        (("-Q", ""), "the question is empty"),
        (("--questions", "/nonexistent/q.txt"), "cannot read --questions"),
        (("--questions", "-", "-"), "stdin cannot be both"),
        (("What?", "--cache-max-gb", "0"), "--cache-max-gb must be"),
    ],
)
def test_ask_question_options_are_checked_first(tiny, args, fragment):
    run = longdoc("ask", str(SAMPLES / "report.pdf"), *args, "--model", tiny)
    assert run.returncode == 2, run.stderr
    assert fragment in run.stderr and "Traceback" not in run.stderr and run.stdout == ""


def test_chat_from_a_pipe(tiny):
    pdf = str(SAMPLES / "report.pdf")
    run = longdoc("chat", pdf, "--model", tiny, "--max-new-tokens", "5", "--json", stdin="What is the TTL?\n\nWhy?\n")
    assert run.returncode == 0, run.stderr
    turns = json_lines(run.stdout)
    assert [(t["question"], t["turn"]) for t in turns] == [("What is the TTL?", 1), ("Why?", 2)]
    # the second turn follows the first answer: its prompt holds the first prompt and answer
    assert turns[1]["prompt_tokens"] > turns[0]["prompt_tokens"] + turns[0]["generated_tokens"]
    stdin_doc = longdoc("chat", "-", "--model", tiny, stdin="q\n")
    assert stdin_doc.returncode == 2 and "pass the documents as files" in stdin_doc.stderr


def test_chat_in_a_terminal(tiny):
    """Two questions typed at a pseudo-terminal, then Ctrl-D: both answered, exit 0."""
    pdf = str(SAMPLES / "report.pdf")
    main, sub = pty.openpty()
    env = {**os.environ, "LONGDOC_CACHE_DIR": os.environ["LONGDOC_CACHE_DIR"], "TERM": "dumb"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "longdoc", "chat", pdf, "--model", tiny, "--max-new-tokens", "4"],
        stdin=sub,
        stdout=sub,
        stderr=sub,
        cwd=REPO,
        env=env,
        close_fds=True,
    )
    os.close(sub)
    seen = b""

    def read_until(marker: bytes, count: int) -> None:
        nonlocal seen
        deadline = time.time() + 120
        while seen.count(marker) < count and time.time() < deadline:
            ready, _, _ = select.select([main], [], [], 1)
            if ready:
                try:
                    seen += os.read(main, 4096)
                except OSError:
                    break
        assert seen.count(marker) >= count, seen.decode(errors="replace")

    try:
        read_until(b"you> ", 1)
        os.write(main, b"What is the TTL?\n")
        read_until(b"you> ", 2)
        os.write(main, b"And the port?\n")
        read_until(b"you> ", 3)
        os.write(main, b"\x04")  # Ctrl-D
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        os.close(main)
    text = seen.decode(errors="replace")
    assert text.count(" · decode ") == 2, text  # one stats line per answered question
    assert "Traceback" not in text


def test_cache_ls_and_clear(tiny):
    pdf = str(SAMPLES / "report.pdf")
    assert longdoc("ask", pdf, "What?", "--model", tiny, "--max-new-tokens", "2").returncode == 0
    listed = longdoc("cache", "ls", "--json")
    (summary,) = json_lines(listed.stdout)
    (entry,) = summary["entries"]
    assert entry["sources"] == [pdf] and entry["tokens"] >= doccache.MIN_PREFIX_TOKENS and entry["bytes"] > 0
    table = longdoc("cache", "ls")
    assert pdf in table.stdout and "1 entries" in table.stdout
    cleared = longdoc("cache", "clear")
    assert cleared.returncode == 0 and "removed 1 entries" in cleared.stdout
    assert json_lines(longdoc("cache", "ls", "--json").stdout)[0]["entries"] == []


@pytest.mark.slow
def test_real_model_second_question_loads_the_real_pdf_prefix():
    """The embedded model on a real PDF: the second run loads the prefix, and the same question asked
    again gives the cold run's greedy answer token for token (same machine, same bytes)."""
    pdf = str(SAMPLES / "report.pdf")
    opts = ("--json", "--max-new-tokens", "24")
    cold = json_lines(longdoc("ask", pdf, "What was the measured throughput of the Heron pump?", *opts).stdout)[0]
    other = json_lines(longdoc("ask", pdf, "Who wrote the report?", *opts).stdout)[0]
    again = json_lines(longdoc("ask", pdf, "What was the measured throughput of the Heron pump?", *opts).stdout)[0]
    assert cold["cache"]["hit"] is False and cold["cache"]["bytes"] > 0
    assert other["cache"]["hit"] is True and again["cache"]["hit"] is True
    assert other["cache"]["prefix_tokens"] == cold["cache"]["prefix_tokens"] >= doccache.MIN_PREFIX_TOKENS
    assert again["answer"] == cold["answer"] and again["generated_tokens"] == cold["generated_tokens"]
    assert other["prompt_tokens"] != cold["prompt_tokens"]


def test_documents_are_tokenized_once_for_many_questions(tiny, monkeypatch):
    """ask_all with three questions: the document prefix goes through the tokenizer once."""
    from longdoc.tasks.chat import ask_all

    session = LocalBackend(config(tiny, recycle=False, new=2), Reporter(quiet=True))
    docs = ingest_paths([str(SAMPLES / "report.pdf")])
    encoded: list[int] = []
    real = PromptTokens.encode
    monkeypatch.setattr(PromptTokens, "encode", lambda self, text: encoded.append(len(text)) or real(self, text))
    answers: list[Result] = []
    ask_all(session, docs, ["What?", "Who?", "When?"], [], lambda q, r: answers.append(r))
    assert len(answers) == 3 and all(a.generated_tokens > 0 for a in answers)
    longest = max(encoded)
    assert encoded.count(longest) == 1 and longest > 1000  # the prefix, once; the three requests are short

"""Summaries: splitting on natural boundaries, map-reduce orchestration, citations, --paths-from, --each.

The splitting and orchestration tests use a word counter (``len(text.split())``) for the tokenizer and
a fake model step, so they are fast; the end-to-end tests run the real embedded model (marked slow).
"""

from __future__ import annotations

import json
import re
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from typer.testing import CliRunner

from longdoc.cli import app
from longdoc.config import GenerationConfig, RunConfig
from longdoc.errors import DoesNotFitError, InputError
from longdoc.ingest import Document
from longdoc.prompt import Prompt, format_documents
from longdoc.runtime import local
from longdoc.runtime.result import Cache, Dca, LocalEngine, Memory, Recycle, Result, Timings, json_of
from longdoc.tasks import summarize as sm
from longdoc.tasks.citations import extract_citations

SAMPLES = Path(__file__).resolve().parents[1] / "sample_docs"
runner = CliRunner()


def words(text: str | Prompt) -> int:
    return len((text.text if isinstance(text, Prompt) else text).split())


def citations_json(text: str, docs: list[Document]) -> list[Any]:
    """The citations of ``text`` as the JSON result lists them."""
    return [json_of(c) for c in extract_citations(text, docs)]


def sentences(n: int, length: int = 6, tag: str = "s") -> list[str]:
    """``n`` distinct sentences of ``length`` words each, e.g. "S3w0 s3w1 s3w2 s3w3 s3w4 s3w5."."""
    return [" ".join(f"{tag}{i}w{j}" for j in range(length)).capitalize() + "." for i in range(n)]


# --------------------------------------------------------------------------------------------------
# split_text


def test_split_text_pieces_fit_and_keep_order():
    paragraphs = [" ".join(sentences(4, tag=f"p{k}s")) for k in range(5)]  # 24 words each
    text = "\n\n".join(paragraphs)
    pieces = sm.split_text(text, 30, words)
    assert len(pieces) > 1
    assert all(words(p) <= 30 for p in pieces)
    assert "".join(pieces) == text  # nothing lost, nothing reordered


def test_split_text_prefers_paragraphs_then_sentences():
    paragraphs = [" ".join(sentences(3, tag=f"p{k}s")) for k in range(4)]  # 18 words each
    text = "\n\n".join(paragraphs)
    # paragraphs fit: no paragraph is cut, and two fit per piece
    pieces = sm.split_text(text, 40, words)
    assert [p.strip() for p in pieces] == ["\n\n".join(paragraphs[:2]), "\n\n".join(paragraphs[2:])]
    # paragraphs do not fit but sentences do: every sentence is whole in exactly one piece
    pieces = sm.split_text(text, 14, words)
    assert all(words(p) <= 14 for p in pieces)
    for paragraph in paragraphs:
        for sentence in re.findall(r"[^.]+\.", paragraph):
            assert sum(sentence.strip() in p for p in pieces) == 1, sentence


def test_split_text_does_not_cut_after_abbreviations():
    text = "See Fig. 3 for the pump and e.g. the filter. " * 3 + "The mesh is finer. The trial ended."
    pieces = sm.split_text(text, 12, words)
    assert all(words(p) <= 12 for p in pieces)
    assert not any(p.rstrip().endswith(("Fig.", "e.g.")) for p in pieces)


def test_split_text_code_cuts_at_lines_and_hard_cuts_only_overlong_words():
    code = "\n".join(f"x{i} = compute({i}, value{i})" for i in range(20))  # 4 "words" per line
    pieces = sm.split_text(code, 10, words, code=True)
    assert "".join(pieces) == code
    assert all(p.endswith("\n") or p == pieces[-1] for p in pieces)  # never mid-line
    blob = "a" * 50
    chunks = sm.split_text(blob, 7, len)  # one "word" of 50 characters, 7 per piece
    assert "".join(chunks) == blob and all(len(c) <= 7 for c in chunks) and len(chunks) == 8


def test_split_text_rejects_an_empty_budget():
    with pytest.raises(ValueError):
        sm.split_text("some words", 0, words)


# --------------------------------------------------------------------------------------------------
# make_pieces (segments first)


def _pdf(n_pages: int, sentences_per_page: int, source: str = "paper.pdf") -> Document:
    segments = [(f"p. {k}", " ".join(sentences(sentences_per_page, tag=f"pg{k}s"))) for k in range(1, n_pages + 1)]
    return Document(source=source, kind="pdf", segments=segments, pages=n_pages)


def _texts(pieces: list[list[Document]]) -> list[tuple[str, str, str]]:
    return [(d.source, label, text) for piece in pieces for d in piece for label, text in d.segments]


def test_make_pieces_keeps_whole_pages_when_they_fit():
    doc = _pdf(6, 3)  # 18 words per page
    budget = 50
    pieces = sm.make_pieces([doc], budget, words)
    assert all(words(format_documents(p)) <= budget for p in pieces)
    assert len(pieces) == 3  # two pages (plus headers) per piece
    assert _texts(pieces) == [(doc.source, label, text) for label, text in doc.segments]  # whole, in order


def test_make_pieces_splits_a_large_page_at_sentences_under_its_label():
    doc = _pdf(3, 12)  # 72 words per page, more than a piece holds
    budget = 40
    pieces = sm.make_pieces([doc], budget, words)
    assert all(words(format_documents(p)) <= budget for p in pieces)
    units = _texts(pieces)
    for label, text in doc.segments:
        parts = [t for _, lab, t in units if lab == label]
        assert len(parts) > 1
        assert "".join(parts) == text  # order kept inside the page
        for sentence in re.findall(r"[^.]+\.", text):  # sentences fit: none is cut
            assert sum(sentence.strip() in t for t in parts) == 1
    assert [lab for _, lab, _ in units] == sorted((lab for _, lab, _ in units), key=lambda s: int(s[3:]))


def test_make_pieces_over_several_documents_covers_every_segment_in_order():
    docs = [
        _pdf(2, 2, "a.pdf"),
        Document(source="src", kind="code", segments=[("m.py", "x = 1\ny = 2\n"), ("n.py", "def f():\n    pass\n")]),
        Document(source="notes.txt", kind="text", segments=[("notes.txt", " ".join(sentences(30)))]),
    ]
    budget = 45
    pieces = sm.make_pieces(docs, budget, words)
    assert all(words(format_documents(p)) <= budget for p in pieces)
    units = _texts(pieces)
    assert [s for s, _, _ in units] == sorted((s for s, _, _ in units), key=[d.source for d in docs].index)
    for doc in docs:
        for label, text in doc.segments:
            assert "".join(t for s, lab, t in units if s == doc.source and lab == label) == text
    # headers and page counts survive, so citations in partial summaries stay meaningful
    first = pieces[0][0]
    assert first.source == "a.pdf" and first.kind == "pdf" and first.pages == 2


def _group_size(summaries: list[str], group: list[int]) -> int:
    return words(sm.reduce_text([summaries[i] for i in group], group[0], len(summaries)))


def test_group_summaries_fit_and_cover_all():
    summaries = [" ".join(["word"] * n) for n in (10, 30, 5, 25, 20, 8)]
    groups = sm.group_summaries(summaries, 50, words)
    assert [i for g in groups for i in g] == list(range(len(summaries)))
    assert all(_group_size(summaries, g) <= 50 for g in groups)
    assert len(groups) < len(summaries)


def test_group_summaries_even_out_groups():
    summaries = ["a b c"] * 17  # 9 words each with the header; 5 fit in 50
    groups = sm.group_summaries(summaries, 50, words)
    assert sorted(len(g) for g in groups) == [4, 4, 4, 5]  # not 5 + 5 + 5 + 2
    assert [i for g in groups for i in g] == list(range(17))
    assert all(_group_size(summaries, g) <= 50 for g in groups)


def test_complete_sentences_drops_only_a_dangling_fragment():
    cut = "The trial ran for six weeks in spring. The Heron pumped 42.7 litres per minute at a"
    assert sm.complete_sentences(cut) == "The trial ran for six weeks in spring."
    assert sm.complete_sentences("- flow 42.7 l/min\n- draw 410 W\n- cost 1,2") == "- flow 42.7 l/min\n- draw 410 W"
    short_then_long = "Short. " + "then a very long unfinished sentence " * 5
    assert sm.complete_sentences(short_then_long) == short_then_long


def test_step_tokens_are_capped_and_at_most_the_final_budget():
    assert sm.step_tokens(512) == 256
    assert sm.step_tokens(200) == 100
    assert sm.step_tokens(96) == 48
    assert sm.step_tokens(20) == 20


# --------------------------------------------------------------------------------------------------
# map-reduce orchestration with a fake model


class FakeTokenizer:
    chat_template = None


def fake_session(max_context: int, max_new: int) -> Any:
    cfg = RunConfig(max_context=max_context, generation=GenerationConfig(max_new_tokens=max_new))
    session = SimpleNamespace(cfg=cfg, info=None, tokenizer=FakeTokenizer(), count=words, name="fake")
    # local.LocalBackend's methods, over the fake model that fake_model patches into it
    session.plan = lambda prompt_tokens, reserve=0: local.make_plan(session.cfg, None, prompt_tokens)
    session.run = partial(local.LocalBackend.run, session)
    session._run = partial(local.LocalBackend._run, session)
    session.map = partial(local.LocalBackend.map, session)
    session.empty = lambda sources: Result.empty("fake", FAKE_ENGINE, sources)
    return session


FAKE_ENGINE = LocalEngine("fake", "cpu", "float32", "x86-64", None, False, "none", "torch-cpu")


@pytest.fixture
def fake_model(monkeypatch):
    """make_plan refuses prompts over --max-context; a step "summarizes" by keeping the KEYn words it sees."""
    calls: list[dict[str, Any]] = []

    def make_plan(cfg, info, prompt_tokens):
        limit = cfg.max_context
        if prompt_tokens + cfg.generation.max_new_tokens > limit:
            raise DoesNotFitError(f"{prompt_tokens} + {cfg.generation.max_new_tokens} > {limit}")
        return SimpleNamespace(max_context=limit)

    def run(session, prompt, sources, on_text=None, cache=True):
        n = words(prompt)
        make_plan(session.cfg, None, n)  # every step must fit
        keys = list(dict.fromkeys(re.findall(r"KEY\d+", prompt.text)))
        answer = " ".join(keys)
        calls.append(
            {
                "prompt_tokens": n,
                "max_new": session.cfg.generation.max_new_tokens,
                "streamed": bool(on_text),
                "prompt": prompt.text,
            }
        )
        if on_text:
            on_text(answer)
        return Result(
            answer=answer,
            model="fake",
            engine=FAKE_ENGINE,
            prompt_tokens=n,
            generated_tokens=len(keys),
            sources=sources,
            timings=Timings(load_s=0.5, prefill_s=1.0, decode_s=2.0, ttft_s=1.5),
            memory=Memory(peak_rss_bytes=1, kv_cache_bytes=n),
            dca=Dca(),
            recycle=Recycle(),
            cache=Cache(hit=False),
        )

    monkeypatch.setattr(local, "make_plan", make_plan)
    monkeypatch.setattr(local.LocalBackend, "_run", run)
    return calls


def _keyed_pdf(n_pages: int, words_per_page: int) -> Document:
    segments = []
    for k in range(1, n_pages + 1):
        filler = " ".join(f"w{k}x{j}." if j % 8 == 7 else f"w{k}x{j}" for j in range(words_per_page - 1))
        segments.append((f"p. {k}", f"KEY{k} {filler}"))
    return Document(source="long.pdf", kind="pdf", segments=segments, pages=n_pages)


def test_single_pass_when_it_fits(fake_model):
    doc = _keyed_pdf(2, 20)
    streamed: list[str] = []
    result = sm.summarize(fake_session(4000, 100), [doc], "brief", None, SimpleNamespace(status=print), streamed.append)
    assert json_of(result.plan) == {"mode": "single", "pieces": 1, "levels": 1}
    assert len(fake_model) == 1 and streamed == ["KEY1 KEY2"]


@pytest.mark.parametrize("pages", [26, 40])
def test_map_reduce_over_levels_reaches_every_part(fake_model, pages):
    # 60 words a page; a piece holds two pages; one step's reduce prompt holds about 16 partial
    # summaries, the final one (with twice the answer budget) about 10
    doc = _keyed_pdf(pages, 60)
    session = fake_session(260, 64)
    cfg = session.cfg
    status: list[str] = []
    streamed: list[str] = []
    result = sm.summarize(
        session, [doc], "brief", None, SimpleNamespace(status=status.append), streamed.append
    ).to_json()

    plan = result["plan"]
    assert plan["mode"] == "map-reduce" and plan["pieces"] > 10 and plan["levels"] >= 3
    # every page's key made it through every level into the final summary, in order
    assert result["answer"].split() == [f"KEY{k}" for k in range(1, pages + 1)]
    # the final step combines several summaries (26 pages: 13 fit one step's prompt, so two halves)
    assert "Notes on part 2 of" in fake_model[-1]["prompt"]
    # only the final step streams; map and intermediate steps write at most half the final budget
    assert [c["streamed"] for c in fake_model] == [False] * (len(fake_model) - 1) + [True]
    assert {c["max_new"] for c in fake_model[:-1]} == {32} and fake_model[-1]["max_new"] == 64
    assert streamed == [result["answer"]]
    assert session.cfg is cfg  # restored
    # counts and timings add up over all steps
    assert result["prompt_tokens"] == sum(c["prompt_tokens"] for c in fake_model)
    assert result["timings"]["prefill_s"] == pytest.approx(1.0 * len(fake_model))
    assert result["timings"]["decode_s"] == pytest.approx(2.0 * len(fake_model))
    assert plan["steps"] == len(fake_model)
    # the plan and each step are reported on stderr
    assert any("map-reduce plan" in s and f"{plan['pieces']} pieces" in s for s in status)
    assert sum("level 1: summarizing piece" in s for s in status) == plan["pieces"]
    assert any(f"level {plan['levels']}" in s and "final" in s for s in status)


def test_map_reduce_refuses_a_context_too_small_for_pieces(fake_model):
    with pytest.raises(DoesNotFitError, match="max-context"):
        sm.summarize(fake_session(120, 40), [_keyed_pdf(5, 60)], "brief", None, SimpleNamespace(status=print), None)


# --------------------------------------------------------------------------------------------------
# citations


def _docs_for_citations() -> list[Document]:
    return [
        Document("a/report.pdf", "pdf", [("p. 1", "x"), ("p. 2", "y"), ("p. 3", "z")], pages=3),
        Document("b/paper.pdf", "pdf", [(f"p. {k}", "t") for k in range(1, 11)], pages=10),
        Document("proj", "code", [("src/app.py", "a\nb\nc\nd\ne\n"), ("README.md", "one line")]),
        Document("notes/todo.txt", "text", [("notes/todo.txt", "l1\nl2\nl3")]),
    ]


def test_citations_keep_existing_pages_and_drop_others():
    docs = _docs_for_citations()[:1]
    cites = citations_json("Flow is 42.7 l/min (p. 2); see page 3, and also p. 9 and (p.1).", docs)
    assert cites == [
        {"source": "a/report.pdf", "page": 2},
        {"source": "a/report.pdf", "page": 3},
        {"source": "a/report.pdf", "page": 1},
    ]
    assert citations_json("Nothing here (p. 0), pp. 4-7.", docs) == []


def test_citations_with_several_pdfs_say_which_source():
    docs = _docs_for_citations()[:2]
    # page 7 exists only in paper.pdf; page 2 in both: the source named just before wins
    cites = citations_json("DCA scales (p. 7). The report.pdf says (p. 2). Also p. 12.", docs)
    assert cites == [{"source": "b/paper.pdf", "page": 7}, {"source": "a/report.pdf", "page": 2}]
    nearest = citations_json("The report.pdf and paper.pdf agree (p. 2).", docs)
    assert nearest == [{"source": "b/paper.pdf", "page": 2}]
    ambiguous = citations_json("Both agree (p. 2).", docs)
    assert ambiguous == [{"source": "a/report.pdf", "page": 2, "candidates": ["a/report.pdf", "b/paper.pdf"]}]


def test_citations_of_lines_exist_in_files():
    docs = _docs_for_citations()
    text = (
        "The entry point is src/app.py:3 (also app.py:5-6 and proj/src/app.py:2); "
        "README.md:1, README.md:2 and src/gone.py:1 do not all exist; todo.txt:3, notes/todo.txt:4, 12:30."
    )
    cites = citations_json(text, docs)
    assert cites == [
        {"source": "proj", "path": "src/app.py", "line": 3},
        {"source": "proj", "path": "src/app.py", "line": 5},  # 5-6: line 6 is past the end, so no end_line
        {"source": "proj", "path": "src/app.py", "line": 2},
        {"source": "proj", "path": "README.md", "line": 1},
        {"source": "notes/todo.txt", "path": "notes/todo.txt", "line": 3},
    ]
    assert citations_json("see src/app.py:2-4", docs)[0] == {
        "source": "proj",
        "path": "src/app.py",
        "line": 2,
        "end_line": 4,
    }


def test_citations_follow_a_page_selection():
    # --pages 5-7 of a longer PDF: the document has 3 pages in the selection, labelled 5, 6, 7
    doc = Document("big.pdf", "pdf", [("p. 5", "a"), ("p. 6", "b"), ("p. 7", "c")], pages=3)
    assert citations_json("(p. 6) and (p. 2)", [doc]) == [{"source": "big.pdf", "page": 6}]


# --------------------------------------------------------------------------------------------------
# --paths-from


def test_parse_paths_lines_and_nul():
    assert sm.parse_paths(b"a.pdf\r\n\n  \nsome dir/b c.txt\nlast") == ["a.pdf", "some dir/b c.txt", "last"]
    assert sm.parse_paths(b"a\nb\0c d\0\0", null=True) == ["a\nb", "c d"]
    assert sm.parse_paths(b"caf\xc3\xa9.txt\n") == ["caf\u00e9.txt"]
    assert sm.read_paths_from("-", stdin=b"x\ny\n") == ["x", "y"]


def test_read_paths_from_a_missing_file_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="paths-from"):
        sm.read_paths_from(str(tmp_path / "nope.txt"))


def _json_lines(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


@pytest.mark.parametrize("null", [False, True])
def test_paths_from_stdin_reaches_each_input_in_order(tmp_path, null):
    """Missing inputs fail at ingestion, before any model loads: the order and the parsing show in the errors."""
    names = [str(tmp_path / "one.pdf"), str(tmp_path / "two words.txt"), str(tmp_path / "three.md")]
    data = ("\0".join(names) + "\0") if null else "\n".join(names) + "\n"
    args = ["summarize", "--each", "--json", "--paths-from", "-", *(["-0"] if null else [])]
    result = runner.invoke(app, [*args, str(tmp_path / "zero.txt")], input=data)
    assert result.exit_code == 3, result.stderr
    lines = _json_lines(result.stdout)
    assert [line["path"] for line in lines] == [str(tmp_path / "zero.txt"), *names]  # positional paths first
    assert all("no such file" in line["error"] for line in lines)


def test_paths_from_usage_errors(tmp_path):
    result = runner.invoke(app, ["summarize", "-", "--paths-from", "-"], input="x\n")
    assert result.exit_code == 2 and "stdin" in result.stderr
    result = runner.invoke(app, ["summarize", str(SAMPLES / "notes.md"), "-0"])
    assert result.exit_code == 2 and "paths-from" in result.stderr
    empty = tmp_path / "list.txt"
    empty.write_text("\n\n")
    result = runner.invoke(app, ["summarize", "--paths-from", str(empty)])
    assert result.exit_code == 2 and "PATH" in result.stderr


# --------------------------------------------------------------------------------------------------
# end to end with the real embedded model


@pytest.mark.slow
def test_forced_map_reduce_passes_every_map_output_to_the_reduce(monkeypatch):
    """report.pdf needs a 560-token prompt: at --max-context 480 each page is summarized on its own, and
    the reduce prompt carries every map output (what the model writes is measured in benchmarks)."""
    steps: list[tuple[str, dict]] = []
    real = local.LocalBackend._run

    def spy(session, prompt, sources, on_text=None, cache=True):
        result = real(session, prompt, sources, on_text, cache)
        steps.append((prompt.text, result.to_json()))
        return result

    monkeypatch.setattr(local.LocalBackend, "_run", spy)
    result = runner.invoke(
        app, ["summarize", str(SAMPLES / "report.pdf"), "--max-context", "480", "--max-new-tokens", "96", "--json"]
    )
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["plan"] == {"mode": "map-reduce", "pieces": 3, "levels": 2, "steps": 4}
    assert len(steps) == 4 and all(r["prompt_tokens"] <= 480 - r["generated_tokens"] for _, r in steps)
    assert "map-reduce plan: 3 pieces" in result.stderr and "level 2" in result.stderr
    reduce_prompt = steps[-1][0]
    cap = sm.step_tokens(96)
    for k, (prompt, step) in enumerate(steps[:3], start=1):
        assert f"[p. {k}]" in prompt and f"[p. {k + 1}]" not in prompt  # one page per piece, in order
        text = step["answer"] if step["generated_tokens"] < cap else sm.complete_sentences(step["answer"])
        assert text.strip(), f"map step {k} wrote nothing"
        assert f"Notes on part {k} of 3:\n{text.strip()}" in reduce_prompt
    assert out["answer"] == steps[-1][1]["answer"]
    assert out["prompt_tokens"] == sum(r["prompt_tokens"] for _, r in steps)
    assert out["generated_tokens"] == sum(r["generated_tokens"] for _, r in steps)
    assert all(c["source"] == str(SAMPLES / "report.pdf") and 1 <= c["page"] <= 3 for c in out["citations"])


@pytest.mark.slow
def test_each_with_a_broken_input_continues_and_exits_3(tmp_path):
    bad = tmp_path / "broken.pdf"
    bad.write_bytes((SAMPLES / "report.pdf").read_bytes()[:700])
    paths = [str(SAMPLES / "notes.md"), str(bad), str(SAMPLES / "report.pdf")]
    result = runner.invoke(app, ["summarize", "--each", "--json", "--max-new-tokens", "16", *paths])
    assert result.exit_code == 3, result.stderr
    lines = _json_lines(result.stdout)
    assert [line["path"] for line in lines] == paths
    assert "broken.pdf" in lines[1]["error"] and "summary" not in lines[1]
    for line in (lines[0], lines[2]):
        assert "error" not in line and line["summary"].strip()
        assert line["prompt_tokens"] > 100 and line["timings"]["prefill_s"] > 0
    assert "broken.pdf" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_paths_from_stdin_end_to_end():
    listed = f"{SAMPLES / 'report.pdf'}\n{SAMPLES / 'tinycalc'}\n"
    result = runner.invoke(
        app, ["summarize", "--paths-from", "-", "--each", "--json", "--max-new-tokens", "16"], input=listed
    )
    assert result.exit_code == 0, result.stderr
    lines = _json_lines(result.stdout)
    assert [line["path"] for line in lines] == listed.split()
    assert all(line["summary"].strip() and line["plan"]["mode"] == "single" for line in lines)

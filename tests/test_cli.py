"""The command-line contract: exit codes, stdout/stderr separation, JSON fields; end to end on the
real embedded model (marked slow; CI runs them)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from longdoc.cli import app

from .conftest import CORPUS, REPO

SAMPLES = REPO / "sample_docs"
runner = CliRunner()


def invoke(*args: str, input: str | bytes | None = None):
    return runner.invoke(app, list(args), input=input)


def assert_clean_error(result, code: int, fragment: str) -> None:
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    assert fragment in result.stderr
    assert result.stdout == ""


def test_missing_path_is_an_input_error(tmp_path):
    assert_clean_error(invoke("ask", str(tmp_path / "nope.pdf"), "What?"), 3, "no such file")


def test_empty_question_is_a_usage_error():
    assert_clean_error(invoke("ask", str(SAMPLES / "notes.md"), "   "), 2, "question is empty")


def test_question_without_path_is_a_usage_error():
    assert_clean_error(invoke("ask", "What?"), 2, "PATH")


def test_corrupt_pdf_is_an_input_error(tmp_path):
    bad = tmp_path / "broken.pdf"
    bad.write_bytes((SAMPLES / "report.pdf").read_bytes()[:700])
    assert_clean_error(invoke("ask", str(bad), "What?"), 3, "broken.pdf")


def test_empty_folder_is_an_input_error(tmp_path):
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01\x02" * 100)
    assert_clean_error(invoke("summarize", str(tmp_path)), 3, "no readable files")


def test_bad_option_values_are_usage_errors():
    assert_clean_error(invoke("ask", str(SAMPLES / "notes.md"), "q", "--recycle-schedule", "sometimes"), 2, "fixed")
    assert_clean_error(
        invoke("ask", str(SAMPLES / "notes.md"), "q", "--chunk-size", "64", "--local-window", "64"), 2, "local-window"
    )
    assert_clean_error(invoke("ask", str(SAMPLES / "report.pdf"), "q", "--pages", "7-9"), 2, "page")


# ---- end to end on the embedded model -----------------------------------------------------------


@pytest.mark.slow
def test_ask_pdf_json_answers_with_all_fields():
    result = invoke(
        "ask",
        str(SAMPLES / "report.pdf"),
        "What was the measured throughput of the Heron pump?",
        "--json",
        "--max-new-tokens",
        "48",
    )
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1  # one JSON object and nothing else on stdout
    data = json.loads(lines[0])
    assert data["answer"].strip()
    for key in (
        "answer",
        "model",
        "prompt_tokens",
        "generated_tokens",
        "sources",
        "timings",
        "memory",
        "dca",
        "recycle",
        "cache",
    ):
        assert key in data
    for key in ("ingest_s", "load_s", "prefill_s", "decode_s", "prefill_tok_s", "decode_tok_s", "ttft_s"):
        assert data["timings"][key] >= 0
    assert data["memory"]["peak_rss_bytes"] > 0 and data["memory"]["kv_cache_bytes"] > 0
    assert data["sources"] == [
        {"path": str(SAMPLES / "report.pdf"), "kind": "pdf", "pages": 3, "tokens": data["sources"][0]["tokens"]}
    ]
    assert 0 < data["generated_tokens"] <= 48 and data["prompt_tokens"] > data["sources"][0]["tokens"]


@pytest.mark.slow
def test_ask_streams_plain_answer_and_stats_on_stderr():
    result = invoke(
        "ask",
        str(SAMPLES / "notes.md"),
        "Which TCP port does Lighthouse use for cache traffic?",
        "--max-new-tokens",
        "40",
    )
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip()  # the streamed answer, and nothing decorative
    assert "prefill" in result.stderr and "peak RSS" in result.stderr
    assert "prefill" not in result.stdout and "peak RSS" not in result.stdout


@pytest.mark.slow
def test_ask_from_stdin():
    text = (SAMPLES / "notes.md").read_text()
    result = invoke("ask", "-", "Who is the author of these notes?", "--json", "--max-new-tokens", "32", input=text)
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["sources"] == [
        {
            "path": "<stdin>",
            "kind": "text",
            "pages": data["sources"][0]["pages"],
            "tokens": data["sources"][0]["tokens"],
        }
    ]
    assert data["sources"][0]["tokens"] > 300 and data["prompt_tokens"] > data["sources"][0]["tokens"]


@pytest.mark.slow
def test_ask_code_folder():
    result = invoke(
        "ask",
        str(SAMPLES / "tinycalc"),
        "Which file defines the parser? Give the file name.",
        "--json",
        "--max-new-tokens",
        "40",
    )
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["sources"][0]["kind"] == "code" and data["sources"][0]["tokens"] > 500
    assert 0 < data["generated_tokens"] <= 40


@pytest.mark.slow
def test_prompt_over_max_context_is_refused_before_model_work():
    result = invoke("ask", str(SAMPLES / "notes.md"), "What?", "--max-context", "300")
    assert_clean_error(result, 4, "exceeds the context limit of 300")
    assert "loading" not in result.stderr  # refused before any weights were loaded


@pytest.mark.slow
def test_dca_forced_on_short_input_gives_same_answer():
    """--dca with the default chunk on a short prompt is exact plain attention: identical greedy answer."""
    args = ("ask", str(SAMPLES / "notes.md"), "What is the default TTL?", "--json", "--max-new-tokens", "24")
    plain = json.loads(invoke(*args, "--no-dca").stdout)
    dca = json.loads(invoke(*args, "--dca").stdout)
    assert dca["dca"]["enabled"] and not plain["dca"]["enabled"]
    assert dca["answer"] == plain["answer"]


@pytest.mark.slow
def test_count_reports_per_source_and_fit():
    result = invoke("count", str(SAMPLES / "notes.md"), str(SAMPLES / "report.pdf"), "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert [s["kind"] for s in data["sources"]] == ["text", "pdf"]
    assert all(s["tokens"] > 100 and s["cl100k"] > 100 for s in data["sources"])
    assert data["fits"] is True
    over = invoke("count", str(SAMPLES / "notes.md"), "--max-context", "200")
    assert over.exit_code == 4 and "does not fit" in over.stdout


@pytest.mark.slow
def test_ask_real_paper_from_corpus():
    paper = CORPUS / "chunkllama.pdf"
    if not paper.exists():
        pytest.skip("shared corpus absent")
    result = invoke(
        "ask",
        str(paper),
        "What is the name of the attention method this paper proposes?",
        "--json",
        "--max-new-tokens",
        "40",
        "--pages",
        "1-3",
    )
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["sources"][0]["kind"] == "pdf" and data["answer"].strip()
    # three of the paper's pages, not all of it
    assert data["sources"][0]["pages"] == 3 and 1000 < data["sources"][0]["tokens"] < 6000


def test_models_reports_the_cache_it_uses(tmp_path, monkeypatch):
    """`models` reads the configured cache (never the user's real one in tests) and says what is converted."""
    monkeypatch.setenv("LONGDOC_CACHE_DIR", str(tmp_path / "cache"))
    result = invoke("models", "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["cache_dir"] == str(tmp_path / "cache")
    default = [m for m in data["models"] if m.get("default")]
    assert len(default) == 1 and default[0]["name"] == "qwen2.5-coder-0.5b"
    assert default[0]["cached"] is False and default[0]["path"] is None  # nothing converted in a new cache
    plain = invoke("models")
    assert plain.exit_code == 0 and str(tmp_path / "cache") in plain.stdout


@pytest.mark.parametrize(
    "extra,fragment",
    [
        (("--chunk-size", "4096"), "--chunk-size must be between 2 and 4095"),
        (("--chunk-size", "100000", "--dca"), "--chunk-size must be between 2 and 4095"),
        (("--local-window", "5000"), "--local-window must be between 0 and 3071"),
        (("--local-window", "-1"), "--local-window must be at least 0"),
    ],
)
def test_bad_dca_layouts_are_usage_errors(tmp_path, monkeypatch, extra, fragment):
    """The layout rule needs the model's trained window (4096 here): checked before any weights load."""
    from .test_models import save_tiny_qwen2

    monkeypatch.setenv("LONGDOC_CACHE_DIR", str(tmp_path / "cache"))
    save_tiny_qwen2(tmp_path / "tiny", window=4096)
    result = invoke("ask", str(SAMPLES / "notes.md"), "Which port?", "--model", str(tmp_path / "tiny"), *extra)
    assert_clean_error(result, 2, fragment)
    assert "loading" not in result.stderr


@pytest.mark.slow
def test_ctrl_c_keeps_what_was_streamed(monkeypatch):
    """An interrupt mid-answer exits 130, keeps the streamed text, and --json still prints the partial result."""
    from longdoc import pipeline

    real = pipeline.TokenStreamer.push
    calls = {"n": 0}

    def interrupt_after_five(self, token):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt
        return real(self, token)

    monkeypatch.setattr(pipeline.TokenStreamer, "push", interrupt_after_five)
    args = ("ask", str(SAMPLES / "notes.md"), "Describe the eviction policy in detail.", "--max-new-tokens", "64")
    result = invoke(*args)
    assert result.exit_code == 130, result.stderr
    assert len(result.stdout.strip()) > 0  # the first five tokens' text stayed on stdout
    assert "Traceback" not in result.stderr
    calls["n"] = 0
    data = json.loads(invoke(*args, "--json").stdout)
    assert data["interrupted"] is True and data["generated_tokens"] == 5 and data["answer"]


def test_ask_with_a_local_model_folder(tmp_path, monkeypatch):
    """The whole pipeline on a tiny random Qwen2 folder given with --model (fast: no real model)."""
    from .test_models import save_tiny_qwen2

    monkeypatch.setenv("LONGDOC_CACHE_DIR", str(tmp_path / "cache"))
    save_tiny_qwen2(tmp_path / "tiny", window=4096)
    args = ("ask", str(SAMPLES / "notes.md"), "Which port?", "--model", str(tmp_path / "tiny"), "--json")
    result = invoke(*args, "--max-new-tokens", "6", "--dtype", "float32")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["generated_tokens"] <= 6 and data["prompt_tokens"] > 100
    assert data["dca"]["enabled"] is False
    # the same prompt with DCA forced and a chunk much smaller than the prompt still runs end to end
    forced = json.loads(invoke(*args, "--max-new-tokens", "6", "--dca", "--chunk-size", "64").stdout)
    assert forced["dca"] == {"enabled": True, "chunk_size": 64, "local_window": 8, "logit_scale": 1.0}
    # a prompt longer than 4x the tiny window is refused before any model work
    over = invoke("ask", str(REPO / "README.md"), "?", "--model", str(tmp_path / "tiny"), "--max-context", "50")
    assert over.exit_code == 4


# Facts the 0.5B model states in float32 and in bfloat16 alike (checked on Xeon/AMX and EPYC/AVX-512-BF16
# machines, and with oneDNN capped at AVX2): the only assertions here that need the model to be right.
FACTS = [
    ("notes.md", "What is the default time-to-live for an entry?", "900"),
    ("notes.md", "Which TCP port does Lighthouse use for cache traffic?", "7311"),
    ("report.pdf", "What was the measured throughput of the Heron pump?", "42.7"),
]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("source,question,fact", FACTS)
def test_answers_stay_right_in_each_dtype(source, question, fact, dtype):
    result = invoke("ask", str(SAMPLES / source), question, "--json", "--max-new-tokens", "40", "--dtype", dtype)
    assert result.exit_code == 0, result.stderr
    assert fact in json.loads(result.stdout)["answer"]


@pytest.mark.slow
def test_eval_commands_on_the_real_model():
    """passkey finds the key through DCA with a chunk far smaller than the prompt; ppl and needle
    report their documented fields."""
    for dtype in ("float32", "bfloat16"):  # the key is found in both dtypes
        passkey = invoke(
            "eval",
            "passkey",
            "--lengths",
            "1536",
            "--depths",
            "0.2",
            "--dca",
            "--chunk-size",
            "512",
            "--json",
            "--quiet",
            "--dtype",
            dtype,
        )
        assert passkey.exit_code == 0, passkey.stderr
        data = json.loads(passkey.stdout)
        assert data["accuracy"] == 1.0, data["results"]
        assert set(data["results"][0]) >= {"length", "depth", "key", "answer", "correct"}
        assert data["settings"]["chunk_size"] == 512 and data["settings"]["local_window"] == 64
    ppl = json.loads(invoke("eval", "ppl", str(SAMPLES / "notes.md"), "--lengths", "300", "--json").stdout)
    assert 1.0 < ppl["results"][0]["ppl"] < 100.0
    needle = invoke(
        "eval",
        "needle",
        "--lengths",
        "1024",
        "--depths",
        "0.5",
        "--keys",
        "1",
        "--recycle-k",
        "64",
        "--recycle-stride",
        "4",
        "--json",
    )
    assert needle.exit_code == 0, needle.stderr
    data = json.loads(needle.stdout)
    assert set(data["accuracy"]) == {"full", "recycled", "streaming"}
    assert all(0.0 <= a <= 1.0 for a in data["accuracy"].values())


@pytest.mark.slow
@pytest.mark.parametrize("layout", [(), ("--dca", "--chunk-size", "256")])
def test_recycled_decoding_covering_the_context_equals_full_in_bfloat16(layout):
    """With K above the context, recycled steps attend to every key through the same kernel calls as
    full attention: the same answer token for token in bfloat16 (with DCA: over several chunks)."""
    args = (
        "ask",
        str(SAMPLES / "notes.md"),
        "Describe the eviction policy in detail.",
        "--json",
        "--dtype",
        "bfloat16",
    )
    args += ("--max-new-tokens", "48", *layout)
    full = json.loads(invoke(*args, "--no-recycle").stdout)
    recycled = json.loads(invoke(*args, "--recycle", "--recycle-k", "100000", "--recycle-stride", "4").stdout)
    assert recycled["recycle"]["enabled"] and recycled["recycle"]["recycled_steps"] > 0
    assert recycled["recycle"]["effective_k"] >= full["prompt_tokens"]
    assert recycled["generated_tokens"] == full["generated_tokens"] > 10
    assert recycled["answer"] == full["answer"]

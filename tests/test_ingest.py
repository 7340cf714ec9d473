"""Ingestion: PDFs by page, folders as git would see them, text and stdin, and every bad-input path."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest
from pypdf import PdfReader, PdfWriter
from reportlab.pdfgen.canvas import Canvas

from longdoc.errors import EXIT_INPUT, InputError, UsageError
from longdoc.ingest import Document, ingest_paths
from longdoc.ingest.code import read_tree
from longdoc.ingest.pdf import parse_pages, read_pdf
from longdoc.ingest.text import is_binary, read_text

from .helpers import corpus_file

REPO = Path(__file__).parents[1]
REPORT = REPO / "sample_docs" / "report.pdf"


def labels(doc: Document) -> list[str]:
    return [label for label, _ in doc.segments]


def write(root: Path, rel: str, content: str | bytes = "x = 1\n") -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def make_pdf(path: Path, pages: list[str | None]) -> Path:
    """A PDF with one page per entry: that text, or (None) only a rectangle, like a scan has no text."""
    canvas = Canvas(str(path))
    for text in pages:
        if text is None:
            canvas.rect(100, 100, 200, 200, fill=1)
        else:
            canvas.drawString(72, 720, text)
        canvas.showPage()
    canvas.save()
    return path


def encrypt(source: Path, target: Path, user_password: str) -> Path:
    writer = PdfWriter(clone_from=PdfReader(source))
    writer.encrypt(user_password=user_password, owner_password="owner-secret")
    with target.open("wb") as out:
        writer.write(out)
    return target


# --- PDF ---------------------------------------------------------------------------------------


def test_pdf_has_one_segment_per_page_labelled_by_page_number() -> None:
    doc = read_pdf(REPORT)
    assert (doc.kind, doc.pages, doc.source) == ("pdf", 3, str(REPORT))
    assert labels(doc) == ["p. 1", "p. 2", "p. 3"]
    pages = dict(doc.segments)
    assert "42.7 litres per minute" in pages["p. 2"]
    assert "42.7" not in pages["p. 1"] + pages["p. 3"]
    assert doc.warnings == []


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("2", ["p. 2"]),
        ("2-3", ["p. 2", "p. 3"]),
        ("3,1", ["p. 1", "p. 3"]),
        ("1-3", ["p. 1", "p. 2", "p. 3"]),
    ],
)
def test_pdf_pages_selects_pages(spec: str, expected: list[str]) -> None:
    doc = read_pdf(REPORT, pages=spec)
    assert labels(doc) == expected
    assert doc.pages == len(expected)


def test_pdf_pages_past_the_end_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="past the end"):
        read_pdf(REPORT, pages="2-4")


@pytest.mark.parametrize(
    ("spec", "n_pages", "expected"),
    [
        ("1-5,9", 10, [1, 2, 3, 4, 5, 9]),
        (" 4 , 1-2 ", 4, [1, 2, 4]),
        ("2,1-3,2", 3, [1, 2, 3]),
        ("7", 7, [7]),
    ],
)
def test_parse_pages(spec: str, n_pages: int, expected: list[int]) -> None:
    assert parse_pages(spec, n_pages) == expected


@pytest.mark.parametrize("spec", ["", "a", "1-", "-3", "1,,2", "1.5", "0", "3-1", "0-2", "11", "9-11"])
def test_parse_pages_rejects_malformed_or_out_of_range(spec: str) -> None:
    with pytest.raises(UsageError, match="--pages"):
        parse_pages(spec, 10)


def test_pdf_without_any_text_layer_is_an_input_error(tmp_path: Path) -> None:
    scan = make_pdf(tmp_path / "scan.pdf", [None, None])
    with pytest.raises(InputError, match="text layer.*OCR"):
        read_pdf(scan)


def test_pdf_pages_without_text_layer_are_counted_in_a_warning(tmp_path: Path) -> None:
    mixed = make_pdf(tmp_path / "mixed.pdf", ["Typed page one", None, "Typed page three"])
    doc = read_pdf(mixed)
    assert labels(doc) == ["p. 1", "p. 3"]
    assert doc.pages == 3
    assert doc.warnings == [f"{mixed}: 1 of 3 pages have no text layer; OCR them first"]


def test_encrypted_pdf_is_an_input_error(tmp_path: Path) -> None:
    locked = encrypt(REPORT, tmp_path / "locked.pdf", user_password="hunter2")
    with pytest.raises(InputError, match="locked.pdf is encrypted with a password"):
        read_pdf(locked)


def test_encrypted_pdf_with_empty_user_password_is_read(tmp_path: Path) -> None:
    restricted = encrypt(REPORT, tmp_path / "restricted.pdf", user_password="")
    assert PdfReader(restricted).is_encrypted
    doc = read_pdf(restricted)
    assert "42.7 litres" in dict(doc.segments)["p. 2"]


def test_truncated_pdf_is_an_input_error_without_log_noise(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = REPORT.read_bytes()
    truncated = write(tmp_path, "truncated.pdf", data[: len(data) // 2])
    caplog.set_level(logging.WARNING)
    with pytest.raises(InputError, match="not a readable PDF") as error:
        read_pdf(truncated)
    assert "\n" not in error.value.message
    assert error.value.exit_code == EXIT_INPUT
    assert [r for r in caplog.records if r.name.startswith("pypdf")] == []


@pytest.mark.parametrize(
    "data",
    [b"", b"plain text with a pdf name", b"%PDF-1.7\n" + bytes(range(256)) * 8, b"%PDF-1.4\n1 0 obj\n<<"],
)
def test_corrupt_pdf_is_an_input_error(tmp_path: Path, data: bytes) -> None:
    with pytest.raises(InputError, match="corrupt\\.pdf"):
        ingest_paths([str(write(tmp_path, "corrupt.pdf", data))])


def test_shared_corpus_pdf_reads_all_pages() -> None:
    doc = read_pdf(corpus_file("chunkllama.pdf"))
    assert doc.pages == 16
    assert labels(doc)[0] == "p. 1"
    assert "Dual Chunk Attention" in doc.text


# --- text and binary detection -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "binary"),
    [
        (b"", False),
        (b"print('hello')\n\tindented\r\n", False),
        ("naïve café — ünïcode ✓\n".encode(), False),
        (b"\x1b[31mred log line\x1b[0m\n", False),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", True),
        (b"text" * 100 + b"\x00", True),
        (bytes(range(1, 32)) * 20, True),
    ],
)
def test_is_binary(data: bytes, binary: bool) -> None:
    assert is_binary(data) is binary


def test_nul_byte_past_the_sniffed_prefix_is_not_looked_at() -> None:
    assert not is_binary(b"a" * 8192 + b"\x00")


def test_text_strips_bom() -> None:
    doc = read_text("bom.txt", b"\xef\xbb\xbfhello\n")
    assert doc.segments == [("bom.txt", "hello\n")]
    assert (doc.kind, doc.warnings) == ("text", [])


def test_non_utf8_text_is_decoded_with_replacement_and_a_warning(tmp_path: Path) -> None:
    latin1 = write(tmp_path, "latin1.txt", "café au lait\n".encode("latin-1"))
    [doc] = ingest_paths([str(latin1)])
    assert doc.segments == [(str(latin1), "caf\ufffd au lait\n")]
    assert doc.warnings == [f"{latin1} is not valid UTF-8; undecodable bytes were replaced"]


@pytest.mark.parametrize("content", ["", "  \n\t\n"])
def test_empty_file_is_an_input_error(tmp_path: Path, content: str) -> None:
    with pytest.raises(InputError, match="empty.txt is empty"):
        ingest_paths([str(write(tmp_path, "empty.txt", content))])


def test_binary_file_given_directly_is_an_input_error(tmp_path: Path) -> None:
    blob = write(tmp_path, "data.txt", b"\x00\x01\x02binary")
    with pytest.raises(InputError, match="binary file, not text"):
        ingest_paths([str(blob)])


# --- paths and stdin ---------------------------------------------------------------------------


def test_missing_path_is_an_input_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.md"
    with pytest.raises(InputError, match="no such file or directory") as error:
        ingest_paths([str(missing)])
    assert error.value.message == f"{missing}: no such file or directory"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs a non-root POSIX user")
def test_unreadable_file_is_an_input_error(tmp_path: Path) -> None:
    secret = write(tmp_path, "secret.txt", "classified\n")
    secret.chmod(0)
    with pytest.raises(InputError, match="cannot read"):
        ingest_paths([str(secret)])


def test_several_paths_keep_their_order(tmp_path: Path) -> None:
    note = write(tmp_path, "note.txt", "a note\n")
    tree = tmp_path / "tree"
    write(tree, "main.py")
    docs = ingest_paths([str(tree), str(REPORT), str(note)])
    assert [(d.source, d.kind) for d in docs] == [
        (str(tree), "code"),
        (str(REPORT), "pdf"),
        (str(note), "text"),
    ]


def test_pdf_is_recognised_by_magic_without_suffix(tmp_path: Path) -> None:
    renamed = write(tmp_path, "report.bin", REPORT.read_bytes())
    [doc] = ingest_paths([str(renamed)], pages="2")
    assert (doc.kind, labels(doc)) == ("pdf", ["p. 2"])


def test_stdin_text() -> None:
    [doc] = ingest_paths(["-"], stdin=b"piped text\n")
    assert (doc.source, doc.kind, doc.segments) == ("<stdin>", "text", [("<stdin>", "piped text\n")])


def test_stdin_pdf_is_read_by_page() -> None:
    [doc] = ingest_paths(["-"], stdin=REPORT.read_bytes())
    assert (doc.source, doc.kind, doc.pages) == ("<stdin>", "pdf", 3)


def test_empty_stdin_is_an_input_error() -> None:
    with pytest.raises(InputError, match="<stdin> is empty"):
        ingest_paths(["-"], stdin=b"")


# --- folders -----------------------------------------------------------------------------------


def read(root: Path, include: list[str] | None = None, exclude: list[str] | None = None, cap: int = 10_000) -> Document:
    return read_tree(root, include or [], exclude or [], cap)


def test_tree_segments_are_files_labelled_by_relative_path(tmp_path: Path) -> None:
    write(tmp_path, "src/app.py", "print('hi')\n")
    doc = read(tmp_path)
    assert (doc.kind, doc.source, doc.pages) == ("code", str(tmp_path), 0)
    assert doc.segments == [("src/app.py", "print('hi')\n")]


def test_tree_order_is_sorted_depth_first(tmp_path: Path) -> None:
    for rel in ["b.py", "c/d/e.py", "a/z.py", "A.txt", "a/b.py", "a.py"]:
        write(tmp_path, rel)
    expected = ["A.txt", "a/b.py", "a/z.py", "a.py", "b.py", "c/d/e.py"]
    assert labels(read(tmp_path)) == expected
    assert labels(read(tmp_path)) == expected


def test_nested_gitignore_applies_to_its_own_subtree(tmp_path: Path) -> None:
    write(tmp_path, ".gitignore", "*.log\nbuild/\n")
    write(tmp_path, "a/.gitignore", "secret.txt\n!keep.log\n")
    write(tmp_path, "a/b/.gitignore", "/local.txt\n")
    for rel in [
        "top.py",
        "run.log",
        "build/out.txt",
        "src/build/gen.py",
        "secret.txt",
        "a/secret.txt",
        "a/b/secret.txt",
        "a/keep.log",
        "a/other.log",
        "a/local.txt",
        "a/b/local.txt",
        "a/b/c/local.txt",
    ]:
        write(tmp_path, rel)
    assert labels(read(tmp_path)) == [
        ".gitignore",
        "a/.gitignore",
        "a/b/.gitignore",
        "a/b/c/local.txt",
        "a/keep.log",
        "a/local.txt",
        "secret.txt",
        "top.py",
    ]


def test_git_folder_is_skipped_and_info_exclude_is_honoured(tmp_path: Path) -> None:
    write(tmp_path, ".git/config", "[core]\n")
    write(tmp_path, ".git/info/exclude", "private.md\n")
    write(tmp_path, "vendor/lib/.git", "gitdir: ../../.git/modules/lib\n")
    write(tmp_path, "private.md", "my notes\n")
    write(tmp_path, "vendor/lib/lib.py")
    write(tmp_path, "main.py")
    assert labels(read(tmp_path)) == ["main.py", "vendor/lib/lib.py"]


def test_binary_files_in_tree_are_skipped_with_a_warning(tmp_path: Path) -> None:
    write(tmp_path, "logo.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    write(tmp_path, "main.py")
    doc = read(tmp_path)
    assert labels(doc) == ["main.py"]
    assert doc.warnings == [f"{tmp_path}: skipped 1 binary files (logo.png)"]


def test_files_over_the_size_limit_are_skipped_with_a_warning(tmp_path: Path) -> None:
    write(tmp_path, "big.txt", "y" * 2000)
    write(tmp_path, "exact.txt", "z" * 1000)
    doc = read(tmp_path, cap=1000)
    assert labels(doc) == ["exact.txt"]
    assert len(doc.warnings) == 1
    assert doc.warnings[0].startswith("big.txt: skipped, 2000 bytes")


@pytest.mark.parametrize(
    ("include", "exclude", "expected"),
    [
        (["*.py"], [], ["src/a.py", "tests/test_a.py", "top.py"]),
        (["src/*.py"], [], ["src/a.py"]),
        ([], ["tests/"], ["README.md", "src/a.py", "src/b.txt", "top.py"]),
        ([], ["*.txt", "README.md"], ["src/a.py", "tests/test_a.py", "top.py"]),
        (["*.py"], ["test_*"], ["src/a.py", "top.py"]),
    ],
)
def test_include_and_exclude_globs(tmp_path: Path, include: list[str], exclude: list[str], expected: list[str]) -> None:
    for rel in ["README.md", "top.py", "src/a.py", "src/b.txt", "tests/test_a.py"]:
        write(tmp_path, rel)
    assert labels(read(tmp_path, include, exclude)) == expected


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symlinks")
def test_symlinks_leaving_the_root_and_symlinked_folders_are_not_followed(tmp_path: Path) -> None:
    root = tmp_path / "root"
    outside = write(tmp_path, "outside/secret.txt", "do not leak\n")
    write(root, "real.py", "real = True\n")
    (root / "leak.txt").symlink_to(outside)
    (root / "alias.py").symlink_to(root / "real.py")
    (root / "loop").symlink_to(root, target_is_directory=True)
    (root / "outdir").symlink_to(outside.parent, target_is_directory=True)
    doc = read(root)
    assert dict(doc.segments) == {"alias.py": "real = True\n", "real.py": "real = True\n"}
    assert "do not leak\n" not in doc.text
    assert [w for w in doc.warnings if w.startswith("leak.txt: skipped, symlink")]


def test_pdfs_in_a_tree_become_page_segments(tmp_path: Path) -> None:
    shutil.copy(REPORT, tmp_path / "docs.pdf")
    write(tmp_path, "notes.md", "# notes\n")
    doc = read(tmp_path, cap=100)  # the size limit is for text files; PDF size says little about text
    assert labels(doc) == ["docs.pdf p. 1", "docs.pdf p. 2", "docs.pdf p. 3", "notes.md"]
    assert "42.7 litres" in dict(doc.segments)["docs.pdf p. 2"]


def test_bad_pdf_in_a_tree_is_skipped_with_a_warning(tmp_path: Path) -> None:
    write(tmp_path, "broken.pdf", REPORT.read_bytes()[:1000])
    write(tmp_path, "main.py")
    doc = read(tmp_path)
    assert labels(doc) == ["main.py"]
    assert len(doc.warnings) == 1
    assert doc.warnings[0].startswith("broken.pdf is not a readable PDF")


def test_tree_with_nothing_readable_is_an_input_error(tmp_path: Path) -> None:
    write(tmp_path, ".git/info/exclude", "*.log\n")
    write(tmp_path, "app.log", "ignored\n")
    write(tmp_path, "a.bin", b"\x00\x01")
    with pytest.raises(InputError) as error:
        ingest_paths([str(tmp_path)])
    assert error.value.message == (f"{tmp_path}: no readable files (2 skipped: 1 binary, 1 ignored by .gitignore)")


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symlinks")
def test_folder_with_only_a_symlinked_folder_is_an_input_error(tmp_path: Path) -> None:
    write(tmp_path, "real/main.py")
    root = tmp_path / "root"
    root.mkdir()
    (root / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    with pytest.raises(InputError, match="no readable files \\(1 skipped: 1 symlinked folder\\)"):
        read(root)


def test_empty_folder_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no readable files \\(the folder is empty\\)"):
        ingest_paths([str(tmp_path)])


def test_sample_code_tree_reads_with_its_gitignore(tmp_path: Path) -> None:
    tree = tmp_path / "tinycalc"
    shutil.copytree(REPO / "sample_docs" / "tinycalc", tree)
    write(tree, "debug.log", "noise\n")
    write(tree, "build/lib/tinycalc/parser.py")
    doc = read(tree, exclude=["__pycache__/"])
    assert "README.md" in labels(doc)
    assert "tinycalc/parser.py" in labels(doc)
    assert not [label for label in labels(doc) if label.endswith(".log") or label.startswith("build/")]


# --- hostile inputs (issue 10) ------------------------------------------------------------------


@pytest.fixture
def no_hang():
    """Fail, rather than hang the suite, when reading blocks (a FIFO opened for reading waits for a writer)."""
    import signal

    def expire(signum, frame):
        raise TimeoutError("ingestion blocked")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(10)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_symlink_loops_in_a_folder_are_skipped_with_a_warning(tmp_path: Path) -> None:
    write(tmp_path, "real.py")
    (tmp_path / "self").symlink_to("self")
    (tmp_path / "ping").symlink_to("pong")
    (tmp_path / "pong").symlink_to("ping")
    doc = read_tree(tmp_path, [], [], 1000)
    assert labels(doc) == ["real.py"]
    assert sorted(w for w in doc.warnings if "symlink loop" in w) == [
        "ping: skipped, symlink loop",
        "pong: skipped, symlink loop",
        "self: skipped, symlink loop",
    ]


def test_symlink_loop_given_as_a_path_is_an_input_error(tmp_path: Path) -> None:
    (tmp_path / "loop").symlink_to("loop")
    with pytest.raises(InputError, match="loop: symlink loop"):
        ingest_paths([str(tmp_path / "loop")])


@pytest.mark.parametrize("kind", ["fifo", "socket", "device"])
def test_special_files_given_as_paths_are_refused(tmp_path: Path, kind: str, no_hang: None) -> None:
    import socket

    path = tmp_path / kind
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        server = socket.socket(socket.AF_UNIX)
        server.bind(str(path))
    else:
        path.symlink_to("/dev/zero")  # a link to a device is a device too
    with pytest.raises(InputError) as raised:
        ingest_paths([str(path)])
    assert raised.value.exit_code == EXIT_INPUT
    assert f"{path} is a" in raised.value.message and "'-'" in raised.value.message
    assert {"fifo": "FIFO", "socket": "socket", "device": "device"}[kind] in raised.value.message


def test_special_files_in_a_folder_are_skipped(tmp_path: Path, no_hang: None) -> None:
    write(tmp_path, "a.py")
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "zero").symlink_to("/dev/zero")  # also a link leaving the folder
    doc = read_tree(tmp_path, [], [], 1000)
    assert labels(doc) == ["a.py"]


def test_per_file_cap_refuses_big_files_and_can_be_raised(tmp_path: Path) -> None:
    from longdoc.ingest import ReadBudget

    big = write(tmp_path, "big.txt", "word " * 1000)
    with pytest.raises(
        InputError, match=r"big.txt: 4\.9K is over the per-file limit of 1K; raise it with --max-file-size"
    ):
        ingest_paths([str(big)], budget=ReadBudget(max_file=1024))
    assert ingest_paths([str(big)], budget=ReadBudget(max_file=8192))[0].text.startswith("word")


def test_stdin_over_the_per_file_cap_is_refused(monkeypatch) -> None:
    import io
    import sys

    from longdoc.ingest import ReadBudget

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"x" * 5000)))
    with pytest.raises(InputError, match="<stdin>: more than the per-file limit of 1K"):
        ingest_paths(["-"], budget=ReadBudget(max_file=1024))


def test_total_cap_stops_a_run_with_a_clear_message(tmp_path: Path) -> None:
    from longdoc.ingest import ReadBudget

    files = [str(write(tmp_path, f"part{i}.txt", "x" * 600)) for i in range(3)]
    assert len(ingest_paths(files, budget=ReadBudget(max_total=2000))) == 3
    with pytest.raises(InputError, match=r"part2.txt: the inputs add up to more than the total limit of 1.5K"):
        ingest_paths(files, budget=ReadBudget(max_total=1536))
    tree = tmp_path / "tree"
    for i in range(3):
        write(tree, f"f{i}.py", "y = 1\n" * 100)
    with pytest.raises(InputError, match=r"tree/f2.py: the inputs add up to more than the total limit"):
        read_tree(tree, [], [], 10_000, budget=ReadBudget(max_total=1500))


def test_pdf_in_a_folder_over_the_per_file_cap_is_skipped(tmp_path: Path) -> None:
    from longdoc.ingest import ReadBudget

    shutil.copy(REPORT, tmp_path / "report.pdf")
    write(tmp_path, "a.py")
    doc = read_tree(tmp_path, [], [], 1000, budget=ReadBudget(max_file=1024))
    assert labels(doc) == ["a.py"]
    assert any("report.pdf" in w and "--max-file-size" in w for w in doc.warnings)


@pytest.mark.parametrize(
    ("spec", "size"),
    [("500", 500), ("4K", 4096), ("1.5M", 3 * 512 * 1024), ("2g", 2 * 1024**3), ("256MB", 256 * 1024**2)],
)
def test_parse_size(spec: str, size: int) -> None:
    from longdoc.ingest import parse_size

    assert parse_size(spec, "--max-file-size") == size


@pytest.mark.parametrize("spec", ["", "lots", "0", "-5M", "1X"])
def test_parse_size_rejects_bad_values(spec: str) -> None:
    from longdoc.ingest import parse_size

    with pytest.raises(ValueError, match="--max-file-size"):
        parse_size(spec, "--max-file-size")


def test_tree_deeper_than_the_recursion_limit_is_read(tmp_path: Path) -> None:
    import sys

    depth = sys.getrecursionlimit() + 100
    rel = "/".join(["d"] * depth)
    folder = str(tmp_path)
    for _ in range(depth):  # one level at a time: os.makedirs and mkdir(parents=True) recurse themselves
        folder += "/d"
        os.mkdir(folder)
    try:
        Path(f"{folder}/leaf.txt").write_text("deep")
        write(tmp_path, "top.txt", "top")
        doc = read_tree(tmp_path, [], [], 1000)
        assert labels(doc) == [f"{rel}/leaf.txt", "top.txt"]  # depth first, in name order
    finally:  # shutil.rmtree (and pytest's cleanup of old runs) recurse too: remove it level by level
        os.unlink(f"{folder}/leaf.txt")
        while folder != str(tmp_path):
            os.rmdir(folder)
            folder = folder.rsplit("/", 1)[0]


def test_non_utf8_file_names_become_printable_and_tokenizable(tmp_path: Path) -> None:
    from longdoc.prompt import format_document

    fd = os.open(os.fsencode(tmp_path) + b"/caf\xe9.txt", os.O_WRONLY | os.O_CREAT)
    os.write(fd, b"coffee")
    os.close(fd)
    doc = read_tree(tmp_path, [], [], 1000)
    assert labels(doc) == ["caf\udce9.txt"]  # kept as the OS gave it: the label is the real name
    text = format_document(doc)
    assert "--- caf\\xe9.txt ---" in text and text.encode("utf-8")  # the prompt is valid UTF-8
    direct = ingest_paths([os.fsdecode(os.fsencode(tmp_path) + b"/caf\xe9.txt")])[0]
    assert format_document(direct).encode("utf-8")


def _encrypted_report(path: Path, user_password: str, algorithm: str) -> Path:
    writer = PdfWriter(clone_from=PdfReader(REPORT))
    writer.encrypt(user_password=user_password, owner_password="owner-secret", algorithm=algorithm)
    with path.open("wb") as out:
        writer.write(out)
    return path


@pytest.mark.parametrize("algorithm", ["RC4-128", "AES-128", "AES-256"])
def test_encrypted_pdfs_with_an_empty_user_password_are_read(tmp_path: Path, algorithm: str) -> None:
    doc = read_pdf(_encrypted_report(tmp_path / "restricted.pdf", "", algorithm))
    assert labels(doc) == ["p. 1", "p. 2", "p. 3"] and "42.7" in dict(doc.segments)["p. 2"]


@pytest.mark.parametrize("algorithm", ["RC4-128", "AES-256"])
def test_encrypted_pdfs_with_a_user_password_say_encrypted(tmp_path: Path, algorithm: str) -> None:
    path = _encrypted_report(tmp_path / "locked.pdf", "hunter2", algorithm)
    with pytest.raises(InputError, match="locked.pdf is encrypted with a password") as raised:
        read_pdf(path)
    assert raised.value.exit_code == EXIT_INPUT


def test_missing_crypto_support_is_not_reported_as_no_text_layer(tmp_path: Path, monkeypatch) -> None:
    from pypdf import PageObject
    from pypdf.errors import DependencyError

    def needs_crypto(self, *args, **kwargs):
        raise DependencyError("cryptography>=3.1 is required for AES algorithm")

    monkeypatch.setattr(PageObject, "extract_text", needs_crypto)
    with pytest.raises(InputError, match="report.pdf is encrypted \\(AES\\); reading it needs the 'cryptography'"):
        read_pdf(REPORT)

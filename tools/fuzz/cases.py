"""Hostile inputs, built reproducibly from a seed: case ``i`` of seed ``s`` is always the same input.

Each case is a list of paths (and for some, bytes for stdin) made under a work folder: mutated PDFs
from ``sample_docs`` and the shared corpus (truncated, bytes flipped, xref damaged, RC4/AES
encrypted with and without a user password, thousands of pages, pages without text), random
binaries, empty files, FIFOs, sockets, device files, symlink loops and links out of the tree, deep
trees, non-UTF-8, markup-like and control-character names, huge single-line texts, mixed encodings.
"""

from __future__ import annotations

import functools
import io
import os
import random
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "sample_docs"
CORPUS = REPO.parent / "shared" / "corpus"

# Names a user's folders really hold, and ones chosen to break printing, JSON and tokenizers.
NAMES = [
    "notes.txt",
    "report.pdf",
    "main.py",
    "[bold]x.txt",
    "notes[/x].txt",
    "[red]alert[/red].md",
    ":smile: face.txt",
    "tab\there.txt",
    "new\nline.txt",
    "esc\x1b[31mred.txt",
    "spaces  and 'quotes\".txt",
    "日本語.txt",
    "-dash-first.txt",
    "CON.txt",
    "x" * 200 + ".txt",
]
RAW_NAMES = [b"caf\xe9.txt", b"\xff\xfe.md", b"ok-\xc3(.py", b"sjis-\x82\xa0.txt"]
# Scale of the biggest inputs (pages of "many pages" PDFs, repeats of huge lines): 1 for the full run,
# smaller for the CI slice (set by make_case), which must stay well under a minute.
_scale = {"value": 1.0}


@dataclass
class Case:
    """One fuzz input: the paths to give, what made them, and bytes for '-' (stdin) if any."""

    index: int
    kind: str
    paths: list[str]
    stdin: bytes | None = None
    keep: list[object] = field(default_factory=list)  # objects that must stay alive (bound sockets)

    def close(self) -> None:
        for obj in self.keep:
            close = getattr(obj, "close", None)
            if close:
                close()


@functools.lru_cache(maxsize=1)
def pdf_seeds() -> tuple[bytes, ...]:
    """Small PDFs to mutate: the sample report, a PDF with pages lacking text, and the first pages of
    each corpus paper (whole papers would make each case slow without finding more)."""
    from pypdf import PdfReader, PdfWriter

    seeds = [(SAMPLES / "report.pdf").read_bytes(), _pdf_without_text()]
    for paper in sorted(CORPUS.glob("*.pdf")):
        reader = PdfReader(paper)
        writer = PdfWriter()
        for page in reader.pages[:2]:
            writer.add_page(page)
        out = io.BytesIO()
        writer.write(out)
        seeds.append(out.getvalue())
    return tuple(seeds)


def _pdf_without_text() -> bytes:
    from reportlab.pdfgen.canvas import Canvas

    out = io.BytesIO()
    canvas = Canvas(out)
    for text in ("Page one has text.", None, None):
        if text is None:
            canvas.rect(100, 100, 200, 200, fill=1)  # a scan: no text layer
        else:
            canvas.drawString(72, 720, text)
        canvas.showPage()
    canvas.save()
    return out.getvalue()


def _encrypted(data: bytes, rng: random.Random) -> bytes:
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(data)))
    user = rng.choice(["", "", "hunter2"])
    writer.encrypt(
        user_password=user, owner_password="owner", algorithm=rng.choice(["RC4-40", "RC4-128", "AES-128", "AES-256"])
    )
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def _many_pages(data: bytes, rng: random.Random) -> bytes:
    light = data in pdf_seeds()[:2]
    count = max(1, int(rng.choice([200, 1000, 3000] if light else [200, 500]) * _scale["value"]))
    return _repeated_page(data, count)


@functools.lru_cache(maxsize=16)
def _repeated_page(data: bytes, count: int) -> bytes:
    """Hundreds or thousands of pages: 3000 of the light seeds' pages (the sample report, the scan),
    at most 500 of a corpus paper's dense pages (each takes ~30 ms to extract: work, not a hang)."""
    from pypdf import PdfReader, PdfWriter

    page = PdfReader(io.BytesIO(data)).pages[0]
    writer = PdfWriter()
    for _ in range(count):
        writer.add_page(page)
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def _flip(data: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 64)):
        buf[rng.randrange(len(buf))] = rng.randrange(256)
    return bytes(buf)


def _damage_xref(data: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    at = data.rfind(b"startxref")
    if at < 0:
        return _flip(data, rng)
    choice = rng.randrange(3)
    if choice == 0:  # point startxref somewhere else
        tail = f"startxref\n{rng.randrange(len(data) * 2)}\n%%EOF\n".encode()
        return bytes(buf[:at]) + tail
    if choice == 1:  # garble the table (or stream) it points to
        xref = data.rfind(b"xref", 0, at)
        start = xref if xref >= 0 else max(0, at - 200)
        for i in range(start, min(len(buf), start + rng.randint(10, 400))):
            buf[i] = rng.randrange(256)
        return bytes(buf)
    return bytes(buf[:at])  # no startxref at all


def mutated_pdf(rng: random.Random) -> tuple[str, bytes]:
    seed = rng.choice(pdf_seeds())
    how = rng.choices(
        ["intact", "truncate", "flip", "xref", "encrypt", "encrypt+flip", "many-pages", "no-pdf-suffix"],
        weights=[1, 4, 4, 3, 3, 1, 0.3, 1],
    )[0]
    if how == "truncate":
        data = seed[: rng.randrange(len(seed))]
    elif how == "flip":
        data = _flip(seed, rng)
    elif how == "xref":
        data = _damage_xref(seed, rng)
    elif how == "encrypt":
        data = _encrypted(seed, rng)
    elif how == "encrypt+flip":
        data = _flip(_encrypted(seed, rng), rng)
    elif how == "many-pages":
        data = _many_pages(seed, rng)
    else:
        data = seed
    return f"pdf-{how}", data


def _text(rng: random.Random) -> tuple[str, bytes]:
    how = rng.choice(["utf8", "latin1", "mixed", "utf16", "bom", "huge-line", "controls", "whitespace"])
    words = ["the", "pump", "moved", "42.7", "litres", "per", "minute", "at", "Heron", "café", "naïve", "日本"]
    body = " ".join(rng.choice(words) for _ in range(rng.randint(1, 400)))
    if how == "latin1":
        data = body.encode("latin-1", "replace")
    elif how == "mixed":
        data = body.encode() + "ünïcödé".encode("latin-1") + "かな".encode("shift_jis") + body.encode("utf-16")
    elif how == "utf16":
        data = body.encode("utf-16")
    elif how == "bom":
        data = b"\xef\xbb\xbf" + body.encode()
    elif how == "huge-line":
        repeats = max(1, int(rng.choice([1, 1000, 20_000]) * _scale["value"]))
        data = body.replace(" ", "_").encode() * repeats  # up to ~50 MB on one line
    elif how == "controls":
        data = bytes(rng.randrange(32) for _ in range(rng.randint(1, 5000)))
    else:
        data = b" \n\t" * rng.randint(0, 100)
    return f"text-{how}", data


def _binary(rng: random.Random) -> tuple[str, bytes]:
    size = rng.choice([0, 1, 7, 512, 8192, 65536])
    return "binary", rng.randbytes(size)


def _fresh(folder: bytes, name: bytes) -> bytes:
    """``folder/name``, made unique if a path of that name exists already."""
    path = folder + b"/" + name
    while os.path.lexists(path):
        path += b"_"
    return path


def _write(path: bytes, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _name(rng: random.Random, suffix: str = "") -> bytes:
    name = rng.choice(RAW_NAMES) if rng.random() < 0.3 else rng.choice(NAMES).encode()
    if suffix and not name.endswith(suffix.encode()):
        name += suffix.encode()
    return name.replace(b"/", b"_")


def _file(rng: random.Random, folder: bytes) -> tuple[str, bytes]:
    """A file of a random kind in ``folder``; returns its kind and path."""
    maker: Callable[[random.Random], tuple[str, bytes]] = rng.choices([mutated_pdf, _text, _binary], weights=[4, 4, 2])[
        0
    ]
    kind, data = maker(rng)
    suffix = ".pdf" if kind.startswith("pdf") and kind != "pdf-no-pdf-suffix" else ""
    path = _fresh(folder, _name(rng, suffix))
    _write(path, data)
    return kind, path


def _special(rng: random.Random, folder: bytes, keep: list[object]) -> tuple[str, bytes]:
    kind = rng.choice(["fifo", "socket", "dev-zero", "dev-null", "dev-urandom", "dev-link"])
    path = _fresh(folder, _name(rng))
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        path = _fresh(folder, b"sock")  # AF_UNIX paths are limited to about 100 bytes
        server = socket.socket(socket.AF_UNIX)
        server.bind(path)
        keep.append(server)
    elif kind == "dev-link":
        os.symlink(b"/dev/zero", path)
    else:
        return kind, b"/dev/" + kind.split("-")[1].encode()
    return kind, path


def _links(rng: random.Random, folder: bytes) -> str:
    """Symlink loops, links out of the tree and broken links inside ``folder``."""
    kind = rng.choice(["self-loop", "pair-loop", "dir-loop", "outside", "outside-dir", "broken"])
    a, b = _fresh(folder, _name(rng)), _fresh(folder, b"link-b")
    if kind == "self-loop":
        os.symlink(a, a)
    elif kind == "pair-loop":
        os.symlink(b, a)
        os.symlink(a, b)
    elif kind == "dir-loop":
        sub = _fresh(folder, b"sub")
        os.mkdir(sub)
        os.symlink(b"..", sub + b"/up")
    elif kind == "outside":
        os.symlink(b"/etc/hostname", a)
    elif kind == "outside-dir":
        os.symlink(b"/", a)
    else:
        os.symlink(b"/nonexistent/target", a)
    return kind


def _deep(rng: random.Random, folder: bytes) -> None:
    depth = rng.choice([50, 400, 1200])  # past Python's recursion limit at 1200
    path = folder
    for _ in range(depth):
        path += b"/d"
        os.mkdir(path)
    _write(path + b"/leaf.txt", b"the deepest note")


def _gitignore(rng: random.Random, folder: bytes) -> None:
    patterns = ["*.pdf", "!keep.pdf", "[", "**/", "\\", "a[!", "***", "/", "!", "#x", "d/", "*.txt\n!notes.txt"]
    _write(folder + b"/.gitignore", "\n".join(rng.sample(patterns, rng.randint(1, 4))).encode())


def tree(rng: random.Random, folder: bytes, keep: list[object]) -> str:
    os.makedirs(folder)
    parts = []
    for _ in range(rng.randint(0, 8)):
        what = rng.choices(["file", "special", "links", "subfolder", "deep", "gitignore"], [8, 1, 2, 2, 0.3, 1])[0]
        parts.append(what)
        if what == "file":
            _file(rng, folder)
        elif what == "special":
            _special(rng, folder, keep)
        elif what == "links":
            _links(rng, folder)
        elif what == "subfolder":
            sub = _fresh(folder, _name(rng).replace(b".", b"_"))
            os.mkdir(sub)
            _file(rng, sub)
        elif what == "deep":
            if not os.path.lexists(folder + b"/d"):
                _deep(rng, folder)
        else:
            _gitignore(rng, folder)
    return "tree(" + ",".join(sorted(set(parts))) + ")"


def make_case(seed: int, index: int, work: Path, scale: float = 1.0) -> Case:
    """Case ``index`` of ``seed`` under the folder ``work`` (which it owns); ``scale`` shrinks the
    biggest inputs (the same kinds of case, fewer pages and repeats)."""
    rng = random.Random(f"{seed}:{index}")
    _scale["value"] = scale
    folder = os.fsencode(work) + f"/case{index}".encode()
    os.makedirs(folder)
    keep: list[object] = []
    what = rng.choices(
        ["pdf", "text", "binary", "empty", "special", "links", "tree", "stdin", "several"],
        weights=[30, 14, 6, 3, 6, 5, 30, 3, 3],
    )[0]
    if what in ("pdf", "text", "binary"):
        kind, path = _file(rng, folder) if what != "pdf" else _pdf_file(rng, folder)
        return Case(index, kind, [os.fsdecode(path)])
    if what == "empty":
        path = _fresh(folder, _name(rng))
        _write(path, b"")
        return Case(index, "empty", [os.fsdecode(path)])
    if what == "special":
        kind, path = _special(rng, folder, keep)
        return Case(index, kind, [os.fsdecode(path)], keep=keep)
    if what == "links":
        kind = _links(rng, folder)
        target = folder + b"/link-b" if kind == "pair-loop" and rng.random() < 0.5 else folder
        return Case(index, f"link-{kind}", [os.fsdecode(target)])
    if what == "stdin":
        kind, data = rng.choice([mutated_pdf, _text, _binary])(rng)
        return Case(index, f"stdin-{kind}", ["-"], stdin=data)
    if what == "several":
        paths = [os.fsdecode(_file(rng, folder)[1]) for _ in range(rng.randint(2, 5))]
        return Case(index, "several", paths)
    kind = tree(rng, folder + b"/tree", keep)
    return Case(index, kind, [os.fsdecode(folder + b"/tree")], keep=keep)


def _pdf_file(rng: random.Random, folder: bytes) -> tuple[str, bytes]:
    kind, data = mutated_pdf(rng)
    path = _fresh(folder, _name(rng, "" if kind == "pdf-no-pdf-suffix" else ".pdf"))
    _write(path, data)
    return kind, path


def remove(path: Path) -> None:
    """Delete a case folder bottom-up without recursion (deep trees outgrow shutil.rmtree's)."""
    top = os.fsencode(path)
    if not os.path.lexists(top):
        return
    stack, folders = [top], []
    while stack:
        folder = stack.pop()
        folders.append(folder)
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                else:
                    os.unlink(entry.path)
    for folder in reversed(folders):
        os.rmdir(folder)

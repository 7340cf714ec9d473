"""Citations in a model's answer, checked against the inputs: only places that exist are kept.

The system prompt asks the model to cite "(p. N)" for a PDF page and "(path:line)" for a file.
A small model also invents citations (page 40 of a 16-page paper, a line past the end of a file);
those are dropped, so a script can trust every citation it is given.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from longdoc.ingest import Document
from longdoc.runtime.result import Citation

# "p. 3", "p.3", "pp. 2-4", "pp. 2, 5", "page 7", "pages 3 and 4", "Page 2" ("pp"/"pages" allow lists).
_PAGE = re.compile(
    r"(?<![A-Za-z0-9])(?P<word>pp\.|p\.|pages|page)\s*"
    r"(?P<nums>\d+(?:\s*(?:[-\u2013\u2014]|to)\s*\d+)?(?:\s*(?:,|&|and)\s*\d+(?:\s*(?:[-\u2013\u2014]|to)\s*\d+)?)*)",
    re.IGNORECASE,
)
_RANGE = re.compile(r"(\d+)(?:\s*(?:[-\u2013\u2014]|to)\s*(\d+))?")
# "path:12" or "path:12-20": a path is anything without spaces, quotes or brackets; the lookup filters it.
_PATH_LINE = re.compile(r"(?<![\w/.:-])(?P<path>[\w.\-/\\][^\s:()\[\]{}<>`'\",;]*):(?P<line>\d+)(?:-(?P<end>\d+))?")
# A PDF read from inside a folder has segments labelled "sub/paper.pdf p. 3".
_PDF_IN_FOLDER = re.compile(r"^(?P<rel>.+) p\. (?P<page>\d+)$")
# Ranges longer than this are checked by their ends only, so "pp. 1-900" cannot produce 900 entries.
_MAX_EXPANDED_RANGE = 20
# How far before a page citation a source name may appear to say which PDF is meant.
_HINT_CHARS = 120


@dataclass
class _PdfPages:
    source: str  # the path reported in citations
    names: tuple[str, ...]  # ways an answer may refer to it: the path, its file name, its stem
    pages: frozenset[int]


@dataclass
class _LinedFile:
    source: str  # the input it came from (a folder, or the text file itself)
    path: str  # the label answers cite
    full: str  # path joined to the folder
    lines: int


def extract_citations(text: str, docs: list[Document]) -> list[Citation]:
    """Page and ``path:line`` citations in ``text`` that exist in ``docs``, in order of appearance.

    Page citations: ``{"source", "page"}``, kept when some PDF input has that page; with several
    PDFs, the one named just before the citation, else the only one with that page, else the first
    (then ``candidates`` lists them all). Line citations: ``{"source", "path", "line"}`` (``end_line``
    for a range), kept when the path is a file of a folder input (or a text input) and the lines exist.
    """
    pdfs = _pdf_pages(docs)
    files = _lined_files(docs)
    found: list[tuple[int, Citation]] = []
    seen: set[tuple[object, ...]] = set()

    def add(pos: int, entry: Citation) -> None:
        key = (entry.source, entry.page, entry.path, entry.line, entry.end_line)
        if key not in seen:
            seen.add(key)
            found.append((pos, entry))

    if pdfs:
        for match in _PAGE.finditer(text):
            hint = text[max(0, match.start() - _HINT_CHARS) : match.start()]
            for page in _pages_of(match):
                entry = _page_citation(page, pdfs, hint)
                if entry is not None:
                    add(match.start(), entry)
    if files:
        for match in _PATH_LINE.finditer(text):
            entry = _line_citation(match, files)
            if entry is not None:
                add(match.start(), entry)
    found.sort(key=lambda item: item[0])
    return [entry for _, entry in found]


def _pages_of(match: re.Match[str]) -> list[int]:
    word = match.group("word").lower()
    nums = match.group("nums")
    if word in ("p.", "page"):  # singular: only the first number or range ("p. 3, 2024" is not a list)
        first = _RANGE.match(nums)
        assert first is not None
        ranges = [first]
    else:
        ranges = list(_RANGE.finditer(nums))
    pages: list[int] = []
    for r in ranges:
        start = int(r.group(1))
        end = int(r.group(2)) if r.group(2) else start
        if end < start:
            pages.append(start)
        elif end - start <= _MAX_EXPANDED_RANGE:
            pages.extend(range(start, end + 1))
        else:
            pages.extend((start, end))
    return pages


def _page_citation(page: int, pdfs: list[_PdfPages], hint: str) -> Citation | None:
    having = [p for p in pdfs if page in p.pages]
    if not having:
        return None
    if len(having) > 1:
        named = [p for p in having if any(_mentions(hint, name) for name in p.names)]
        if len(named) >= 1:
            # the source named last before the citation
            named.sort(key=lambda p: max(hint.rfind(n) for n in p.names if _mentions(hint, n)))
            return Citation(source=named[-1].source, page=page)
        return Citation(source=having[0].source, page=page, candidates=[p.source for p in having])
    return Citation(source=having[0].source, page=page)


def _mentions(hint: str, name: str) -> bool:
    return bool(name) and name in hint


def _line_citation(match: re.Match[str], files: list[_LinedFile]) -> Citation | None:
    cited = _norm(match.group("path"))
    line = int(match.group("line"))
    end = int(match.group("end")) if match.group("end") else None
    target = _find_file(cited, files)
    if target is None or not 1 <= line <= target.lines:
        return None
    end_line = end if end is not None and line < end <= target.lines else None
    return Citation(source=target.source, path=target.path, line=line, end_line=end_line)


def _find_file(cited: str, files: list[_LinedFile]) -> _LinedFile | None:
    """Exact label or full path first, then a unique match on a trailing part of the path ("parser.py")."""
    cited = cited.removeprefix("./")
    for f in files:
        if cited in (f.path, f.full):
            return f
    tails = [f for f in files if f.path.endswith("/" + cited) or f.full.endswith("/" + cited)]
    return tails[0] if len(tails) == 1 else None


def _norm(path: str) -> str:
    return path.replace("\\", "/").rstrip(".")


def _pdf_pages(docs: list[Document]) -> list[_PdfPages]:
    out: list[_PdfPages] = []
    for doc in docs:
        if doc.kind == "pdf":
            labelled = {int(label[3:]) for label, _ in doc.segments if re.fullmatch(r"p\. \d+", label)}
            # Without a --pages selection the labels run within 1..pages, and pages without a text
            # layer still exist; with one (pages 5-7 of 16: pages == 3) only the labels are known.
            pages = set(labelled)
            if not labelled or max(labelled) <= doc.pages:
                pages.update(range(1, doc.pages + 1))
            out.append(_PdfPages(doc.source, _names(doc.source), frozenset(pages)))
        elif doc.kind == "code":
            by_file: dict[str, set[int]] = {}
            for label, _ in doc.segments:
                m = _PDF_IN_FOLDER.match(label)
                if m and m.group("rel").lower().endswith(".pdf"):
                    by_file.setdefault(m.group("rel"), set()).add(int(m.group("page")))
            for rel, pages in by_file.items():
                full = os.path.join(doc.source, rel)
                out.append(_PdfPages(full, (*_names(full), rel), frozenset(pages)))
    return out


def _names(path: str) -> tuple[str, ...]:
    base = os.path.basename(path)
    stem = os.path.splitext(base)[0]
    return tuple(n for n in (path, base, stem) if n)


def _lined_files(docs: list[Document]) -> list[_LinedFile]:
    out: list[_LinedFile] = []
    for doc in docs:
        if doc.kind == "code":
            for label, text in doc.segments:
                if _PDF_IN_FOLDER.match(label) and label.lower().split(" p. ")[0].endswith(".pdf"):
                    continue  # PDF pages inside a folder are cited by page, not line
                full = _norm(os.path.join(doc.source, label))
                out.append(_LinedFile(doc.source, label, full, _line_count(text)))
        elif doc.kind == "text" and doc.source != "<stdin>":
            text = doc.text
            src = _norm(doc.source)
            out.append(_LinedFile(doc.source, src, src, _line_count(text)))
    return out


def _line_count(text: str) -> int:
    return len(text.splitlines())

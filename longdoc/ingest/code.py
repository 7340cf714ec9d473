"""Folders (code trees, folders of papers): every readable file becomes a segment labelled by its path.

Follows what git would track: `.git` is skipped, `.gitignore` files apply at every depth and
`.git/info/exclude` at the root, so build output and vendored dependencies stay out of the
prompt. The walk is sorted so the same tree always gives the same prompt (and cache key).
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pathspec

from longdoc.errors import InputError
from longdoc.ingest import Document, FileProgress, ReadBudget, read_regular
from longdoc.ingest.pdf import is_pdf, read_pdf_bytes
from longdoc.ingest.text import decode_text, is_binary

# Ignore rules in force in a folder: (folder path relative to the root, "" or ending in "/", rules),
# outermost first, so later (deeper) rules override earlier ones as in git.
IgnoreChain = list[tuple[str, pathspec.GitIgnoreSpec]]

# How many skipped binary files a warning names before it only counts them.
_NAMED_BINARIES = 5
# Folders with fewer files are read too fast for a progress display to help.
PROGRESS_MIN_FILES = 50


def read_tree(
    root: Path,
    include: list[str],
    exclude: list[str],
    max_file_bytes: int,
    *,
    budget: ReadBudget | None = None,
    progress: FileProgress | None = None,
) -> Document:
    """Read every file under `root` that git would not ignore and the globs select.

    `include`/`exclude` are gitignore-style globs on the path relative to `root`: a glob
    without "/" (such as "*.py") matches the file name at any depth. Binary files, files over
    `max_file_bytes` (PDFs excepted: their size says little about their text; they are held to
    `budget`'s per-file cap), symlinks leaving the root or looping, and FIFOs, sockets and devices
    are skipped; raises InputError when nothing readable is left, or when the run goes over
    `budget`'s total cap. `progress` hears (files read, files to read) for folders of at least
    PROGRESS_MIN_FILES files.
    """
    reader = _TreeReader(root, include, exclude, max_file_bytes, budget or ReadBudget())
    chain: IgnoreChain = []
    info_exclude = _load_rules(root / ".git" / "info" / "exclude")
    if info_exclude is not None:
        chain.append(("", info_exclude))
    try:
        files = reader.walk(root, chain)
    except PermissionError:
        raise InputError(f"{root}: permission denied") from None
    except OSError as error:
        raise InputError(f"{root}: cannot read ({error.strerror or error})") from None
    for done, (entry, rel) in enumerate(files, start=1):
        reader.read_entry(entry, rel)
        if progress is not None and len(files) >= PROGRESS_MIN_FILES:
            progress(done, len(files))
    return reader.document()


class _TreeReader:
    """Walk state: the segments found so far, and why other files were skipped."""

    def __init__(
        self, root: Path, include: list[str], exclude: list[str], max_file_bytes: int, budget: ReadBudget
    ) -> None:
        self.root = root
        self.real_root = root.resolve()
        self.include = pathspec.GitIgnoreSpec.from_lines(include) if include else None
        self.exclude = pathspec.GitIgnoreSpec.from_lines(exclude) if exclude else None
        self.max_file_bytes = max_file_bytes
        self.budget = budget
        self.segments: list[tuple[str, str]] = []
        self.warnings: list[str] = []
        self.skipped: Counter[str] = Counter()
        self.binaries: list[str] = []

    def walk(self, root: Path, chain: IgnoreChain) -> list[tuple[os.DirEntry[str], str]]:
        """The files to read, depth-first in name order (the order of the prompt).

        Iterative, with a stack of folder listings: a tree deeper than Python's recursion limit is
        legal. Folders below the root that cannot be listed are skipped with a warning; the root
        itself raises (OSError), since then there is nothing to read.
        """
        files: list[tuple[os.DirEntry[str], str]] = []
        stack = [iter(self._list(root, "", chain))]
        while stack:
            item = next(stack[-1], None)
            if item is None:
                stack.pop()
                continue
            entry, rel, is_dir, rules = item
            if not is_dir:
                if self._selected(rel):
                    files.append((entry, rel))
            elif self.exclude is not None and self.exclude.match_file(rel + "/"):
                self.skipped["excluded by --exclude"] += 1
            else:
                try:
                    stack.append(iter(self._list(Path(entry.path), rel + "/", rules)))
                except OSError as error:
                    self.skipped["unreadable"] += 1
                    reason = "permission denied" if isinstance(error, PermissionError) else error.strerror or error
                    self.warnings.append(f"{rel}/: skipped, {reason}")
        return files

    def _list(
        self, folder: Path, prefix: str, chain: IgnoreChain
    ) -> list[tuple[os.DirEntry[str], str, bool, IgnoreChain]]:
        """The entries of one folder that git would not ignore, in name order, with the rules in force."""
        rules = _load_rules(folder / ".gitignore")
        if rules is not None:
            chain = [*chain, (prefix, rules)]
        with os.scandir(folder) as scan:
            entries = sorted(scan, key=lambda entry: entry.name)
        listed = []
        for entry in entries:
            if entry.name == ".git":  # a folder, or a file in worktrees and submodules
                continue
            rel = prefix + entry.name
            is_dir = entry.is_dir(follow_symlinks=False)
            if _ignored(chain, rel + "/" if is_dir else rel):
                self.skipped["ignored by .gitignore"] += 1
            else:
                listed.append((entry, rel, is_dir, chain))
        return listed

    def _selected(self, rel: str) -> bool:
        if self.exclude is not None and self.exclude.match_file(rel):
            self.skipped["excluded by --exclude"] += 1
            return False
        if self.include is not None and not self.include.match_file(rel):
            self.skipped["not matched by --include"] += 1
            return False
        return True

    def read_entry(self, entry: os.DirEntry[str], rel: str) -> None:
        """Read one file, or record why it was skipped."""
        if entry.is_symlink() and not self._link_ok(entry, rel):
            return
        try:
            if not entry.is_file():  # FIFOs, sockets, devices: reading could block or never end
                self.skipped["not a regular file"] += 1
                return
            size = entry.stat().st_size
        except OSError as error:
            self.skipped["unreadable"] += 1
            self.warnings.append(f"{rel}: skipped, cannot read ({error.strerror or error})")
            return
        if size > self.max_file_bytes and not rel.lower().endswith(".pdf"):
            self.skipped["over the size limit"] += 1
            self.warnings.append(
                f"{rel}: skipped, {size} bytes is over the per-file limit of {self.max_file_bytes} bytes"
            )
            return
        try:
            data = read_regular(entry.path, self.budget, rel)
        except InputError as error:
            if self.budget.total > self.budget.max_total:  # the whole run is over its cap: stop
                raise InputError(f"{self.root}/{error.message}") from None
            self.skipped["over the size limit" if "limit" in error.message else "not a regular file"] += 1
            self.warnings.append(f"{error.message}; skipped")
            return
        except OSError as error:
            self.skipped["unreadable"] += 1
            self.warnings.append(f"{rel}: skipped, cannot read ({error.strerror or error})")
            return
        self._add(rel, data)

    def _link_ok(self, entry: os.DirEntry[str], rel: str) -> bool:
        """Whether a symlink may be read: not broken, looping, to a folder, or out of the root."""
        try:
            target = Path(entry.path).resolve(strict=True)
        except FileNotFoundError:
            self.skipped["broken symlink"] += 1
            return False
        except (OSError, RuntimeError):  # a loop: RuntimeError before Python 3.13, OSError (ELOOP) after
            self.skipped["symlink loop"] += 1
            self.warnings.append(f"{rel}: skipped, symlink loop")
            return False
        if target.is_dir():  # never descended: a link back up would loop forever
            self.skipped["symlinked folder"] += 1
            return False
        if not target.is_relative_to(self.real_root):
            self.skipped["symlink leaving the folder"] += 1
            self.warnings.append(f"{rel}: skipped, symlink to {target} outside {self.root}")
            return False
        return True

    def _add(self, rel: str, data: bytes) -> None:
        """Turn a file's bytes into segments: PDF pages, or the whole text."""
        if is_pdf(rel, data):
            try:
                pdf = read_pdf_bytes(rel, data)
            except InputError as error:  # one bad PDF should not sink the whole folder
                self.skipped["unreadable PDF"] += 1
                self.warnings.append(f"{error.message}; skipped")
                return
            self.segments.extend((f"{rel} {label}", text) for label, text in pdf.segments)
            self.warnings.extend(pdf.warnings)
        elif is_binary(data):
            self.skipped["binary"] += 1
            self.binaries.append(rel)
        else:
            text, warnings = decode_text(rel, data)
            if not text.strip():
                self.skipped["empty"] += 1
                return
            self.segments.append((rel, text))
            self.warnings.extend(warnings)

    def document(self) -> Document:
        """The folder as a Document, or InputError saying why nothing in it could be read."""
        reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(self.skipped.items()))
        if not self.segments:
            detail = f"{self.skipped.total()} skipped: {reasons}" if self.skipped else "the folder is empty"
            raise InputError(f"{self.root}: no readable files ({detail})")
        warnings = list(self.warnings)
        if self.binaries:
            named = ", ".join(self.binaries[:_NAMED_BINARIES])
            unnamed = len(self.binaries) - _NAMED_BINARIES
            more = f" and {unnamed} more" if unnamed > 0 else ""
            warnings.append(f"{self.root}: skipped {len(self.binaries)} binary files ({named}{more})")
        return Document(source=str(self.root), kind="code", segments=self.segments, warnings=warnings)


def _load_rules(path: Path) -> pathspec.GitIgnoreSpec | None:
    """Parse an ignore file if there is one; an unreadable one is treated as absent, and a line that
    is not a valid pattern (a lone "!", say) is skipped, as git does."""
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    try:
        return pathspec.GitIgnoreSpec.from_lines(lines)
    except Exception:  # pathspec raises its own errors, and ValueError, for malformed patterns
        return pathspec.GitIgnoreSpec.from_lines([line for line in lines if _valid_pattern(line)])


def _valid_pattern(line: str) -> bool:
    try:
        pathspec.GitIgnoreSpec.from_lines([line])
    except Exception:
        return False
    return True


def _ignored(chain: IgnoreChain, rel: str) -> bool:
    """Whether git would ignore `rel` (a path relative to the root, "/"-terminated for folders).

    Each rule set sees the path relative to its own folder; the last rule that matches,
    deepest file last, decides, so a nested "!keep.log" can re-include what the root ignored.
    """
    ignored = False
    for base, rules in chain:
        verdict = rules.check_file(rel[len(base) :]).include
        if verdict is not None:
            ignored = verdict
    return ignored

"""Summaries of anything: one pass when the input fits, map-reduce over natural pieces when it does not.

Map-reduce: the inputs are cut into pieces whose ``map`` prompt fits the context budget, cutting at
segments (PDF pages, files) first, then paragraphs, then sentences (lines for code), and words or
characters only as a last resort. Each piece is summarized with the ``map`` template; the partial
summaries are combined with the ``reduce`` template in groups that fit, level by level, until one
summary is left. Only that final summary is streamed.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Sequence
from functools import partial

from longdoc.errors import DoesNotFitError, InputError
from longdoc.ingest import Document
from longdoc.prompt import Prompt, format_documents, render, summary_instructions
from longdoc.render import Reporter
from longdoc.runtime.backend import Backend, OnText
from longdoc.runtime.result import Result, Source, SummaryPlan, sources_of

Count = Callable[[str], int]

# Map (and intermediate reduce) steps write at most half the final answer's tokens, and at most this
# many: short partial summaries keep the reduce prompts small (several must fit one) and the run fast,
# since decoding dominates on a CPU. The final step uses the user's --max-new-tokens.
MAP_MAX_NEW_TOKENS = 256
MAP_MIN_NEW_TOKENS = 32
# Tokens kept free in every prompt for what the estimate of a template's size may miss.
SAFETY_TOKENS = 16
# Below this many tokens of text per piece, map-reduce would need absurdly many steps: refuse.
MIN_PIECE_TOKENS = 64

_PARAGRAPH = re.compile(r"\n[ \t]*\n\s*")
# A sentence ends at . ! ? (perhaps closed by a quote or bracket) followed by whitespace.
_SENTENCE = re.compile(r"[.!?][\"'\u201d\u2019)\]]*\s+")
_LINE = re.compile(r"\n")
_WORD = re.compile(r"\s+")
# Words ending in a period that rarely end a sentence: never cut after them.
_ABBREVIATIONS = frozenset(
    {
        "e.g.",
        "i.e.",
        "al.",
        "etc.",
        "vs.",
        "cf.",
        "fig.",
        "figs.",
        "eq.",
        "eqs.",
        "sec.",
        "tab.",
        "no.",
        "p.",
        "pp.",
        "dr.",
        "mr.",
        "mrs.",
        "ms.",
        "prof.",
        "approx.",
        "resp.",
    }
)
PROSE_LEVELS = (_PARAGRAPH, _SENTENCE, _LINE, _WORD)
CODE_LEVELS = (_PARAGRAPH, _LINE, _WORD)


# --------------------------------------------------------------------------------------------------
# splitting (pure functions: a ``count`` callable stands in for the tokenizer)


def split_text(text: str, budget: int, count: Count, code: bool = False) -> list[str]:
    """Cut ``text`` into consecutive pieces of at most ``budget`` tokens, at the coarsest boundary that works.

    Paragraphs first, then sentences (lines for code), then lines, words, and characters only for a
    single word over the budget. Pieces are as large as the budget allows; ``"".join(pieces) == text``.
    """
    if budget < 1:
        raise ValueError("budget must be at least 1 token")
    return [piece for piece, _ in _split(text, budget, count, CODE_LEVELS if code else PROSE_LEVELS)]


def _split(text: str, budget: int, count: Count, levels: Sequence[re.Pattern[str]]) -> list[tuple[str, int]]:
    n = count(text)
    if n <= budget:
        return [(text, n)]
    for i, level in enumerate(levels):
        parts = _cut_after(text, level)
        if len(parts) > 1:
            pieces: list[tuple[str, int]] = []
            for part in parts:
                pieces.extend(_split(part, budget, count, levels[i + 1 :]))
            return _merge(pieces, budget, count)
    return _hard_cut(text, budget, count)


def _cut_after(text: str, pattern: re.Pattern[str]) -> list[str]:
    """Cut after every match of ``pattern`` (the separator stays with the text before it)."""
    parts: list[str] = []
    start = 0
    for match in pattern.finditer(text):
        end = match.end()
        if end >= len(text) or end <= start:
            continue
        if pattern is _SENTENCE and _ends_with_abbreviation(text[start : match.start() + 1]):
            continue
        parts.append(text[start:end])
        start = end
    parts.append(text[start:])
    return [p for p in parts if p]


def _ends_with_abbreviation(sentence: str) -> bool:
    words = sentence.split()
    if not words:
        return False
    last = words[-1].lower()
    # "e.g.", "Fig.", and initials such as "J." in "J. Smith"
    return last in _ABBREVIATIONS or bool(re.fullmatch(r"[a-z]\.", last))


def _merge(pieces: list[tuple[str, int]], budget: int, count: Count) -> list[tuple[str, int]]:
    """Join consecutive pieces greedily while the sum of their counts stays within ``budget``.

    Counts are nearly additive; each joined piece is counted once more and split again if not.
    """
    out: list[tuple[str, int]] = []
    group: list[tuple[str, int]] = []
    total = 0
    for piece in pieces:
        if group and total + piece[1] > budget:
            out.extend(_join(group, budget, count))
            group, total = [], 0
        group.append(piece)
        total += piece[1]
    if group:
        out.extend(_join(group, budget, count))
    return out


def _join(group: list[tuple[str, int]], budget: int, count: Count) -> list[tuple[str, int]]:
    if len(group) == 1:
        return group
    text = "".join(t for t, _ in group)
    n = count(text)
    if n <= budget:
        return [(text, n)]
    mid = len(group) // 2
    return _join(group[:mid], budget, count) + _join(group[mid:], budget, count)


def _hard_cut(text: str, budget: int, count: Count) -> list[tuple[str, int]]:
    """Longest prefixes within the budget, by binary search on characters (a word longer than the budget)."""
    out: list[tuple[str, int]] = []
    while text:
        lo, hi = 1, len(text)  # the longest fitting prefix is in [lo, hi]; one character always goes
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if count(text[:mid]) <= budget:
                lo = mid
            else:
                hi = mid - 1
        out.append((text[:lo], count(text[:lo])))
        text = text[lo:]
    return out


def make_pieces(docs: Sequence[Document], budget: int, count: Count) -> list[list[Document]]:
    """Pack the documents' segments, in order, into pieces whose ``format_documents`` text fits ``budget``.

    A piece is a list of Documents carrying the same source, kind and page count as the inputs but a
    run of their segments, so it renders with the same headers and citation labels. A segment too
    large for a piece on its own is split with ``split_text`` under its label.
    """
    units: list[tuple[int, str, str, int]] = []  # (doc index, label, text, tokens rendered alone)
    for i, doc in enumerate(docs):
        for label, text in doc.segments:
            alone = count(format_documents([_subdoc(doc, [(label, text)])]))
            if alone <= budget:
                units.append((i, label, text, alone))
                continue
            overhead = count(format_documents([_subdoc(doc, [(label, "")])])) + 2
            if budget - overhead < 1:
                raise DoesNotFitError(f"a piece of {budget} tokens cannot hold even the header of {doc.source}")
            for part in split_text(text, budget - overhead, count, code=doc.kind == "code"):
                units.append((i, label, part, count(format_documents([_subdoc(doc, [(label, part)])]))))

    pieces: list[list[tuple[int, str, str, int]]] = []
    current: list[tuple[int, str, str, int]] = []
    estimate = 0  # an upper bound in practice: every unit was counted with its own document header
    for unit in units:
        if current and estimate + unit[3] > budget:
            exact = count(_render(docs, [*current, unit]))
            if exact > budget:
                pieces.append(current)
                current, estimate = [], 0
            else:
                estimate = exact - unit[3]
        current.append(unit)
        estimate += unit[3]
    if current:
        pieces.append(current)
    return [_group(docs, piece) for piece in pieces]


def _subdoc(doc: Document, segments: list[tuple[str, str]]) -> Document:
    return Document(source=doc.source, kind=doc.kind, segments=segments, pages=doc.pages)


def _group(docs: Sequence[Document], units: list[tuple[int, str, str, int]]) -> list[Document]:
    out: list[Document] = []
    last = -1
    for i, label, text, _ in units:
        if i != last:
            out.append(_subdoc(docs[i], []))
            last = i
        out[-1].segments.append((label, text))
    return out


def _render(docs: Sequence[Document], units: list[tuple[int, str, str, int]]) -> str:
    return format_documents(_group(docs, units))


def group_summaries(summaries: Sequence[str], budget: int, count: Count) -> list[list[int]]:
    """Indices of consecutive summaries grouped so each group's reduce text fits ``budget``.

    As few groups as greedy packing needs, then evened out (16 + 1 becomes 9 + 8) when the even
    groups fit too, so that no part is over-represented in the next level.
    """

    def fits(group: list[int]) -> bool:
        return count(reduce_text([summaries[i] for i in group], group[0], len(summaries))) <= budget

    greedy: list[list[int]] = []
    current: list[int] = []
    for i in range(len(summaries)):
        if current and not fits([*current, i]):
            greedy.append(current)
            current = []
        current.append(i)
    if current:
        greedy.append(current)
    k, n = len(greedy), len(summaries)
    if 1 < k < n:
        bounds = [round(j * n / k) for j in range(k + 1)]
        even = [list(range(bounds[j], bounds[j + 1])) for j in range(k)]
        if all(fits(g) for g in even):
            return even
    return greedy


def reduce_text(summaries: Sequence[str], first: int = 0, total: int | None = None) -> str:
    """Partial summaries as the ``documents`` of a reduce prompt, numbered by part ("of N": all parts).

    Plain "Notes on part 2 of 3:" headers: with "--- ... ---" rulers the default model tended to
    copy the first summary and then make things up rather than combine; with "Summary of part ..."
    it wrote summaries of summaries ("This part of the input summarizes ...") and lost the facts.
    """
    total = total or first + len(summaries)
    return "\n\n".join(f"Notes on part {first + k + 1} of {total}:\n{s.strip()}" for k, s in enumerate(summaries))


# --------------------------------------------------------------------------------------------------
# --paths-from


def parse_paths(data: bytes, null: bool = False) -> list[str]:
    """Paths from ``--paths-from`` input: one per line (blank lines skipped), or NUL-separated with ``-0``.

    Line mode drops a trailing CR (files written on Windows) but keeps other spaces, which can be
    part of a file name; bytes that are not UTF-8 are kept as the OS would (surrogate escapes).
    """
    text = data.decode("utf-8", errors="surrogateescape")
    if null:
        return [p for p in text.split("\0") if p]
    return [line.removesuffix("\r") for line in text.split("\n") if line.strip()]


def read_paths_from(source: str, null: bool = False, stdin: bytes | None = None) -> list[str]:
    """Read ``--paths-from FILE`` (or ``-``: standard input; ``stdin`` stands in for it in tests)."""
    if source == "-":
        data = sys.stdin.buffer.read() if stdin is None else stdin
    else:
        try:
            with open(source, "rb") as f:
                data = f.read()
        except OSError as error:
            raise InputError(f"--paths-from {source}: cannot read ({error.strerror or error})") from None
    return parse_paths(data, null)


# --------------------------------------------------------------------------------------------------
# running


def summarize(
    session: Backend,
    docs: list[Document],
    style: str,
    max_words: int | None,
    reporter: Reporter,
    on_text: OnText | None = None,
) -> Result:
    """Summarize ``docs`` in one pass if the prompt fits, else by map-reduce.

    The result is the final step's, with ``plan`` (mode "single" or "map-reduce", pieces, levels:
    model levels, 1 for a single pass, map + reduce levels otherwise). For map-reduce,
    ``prompt_tokens``, ``generated_tokens`` and the timings add up all steps (``Result.merge``).
    """
    fields = summary_instructions(style, max_words)
    sources = sources_of(docs, session.count)
    prompt = render(session.tokenizer, "summarize", documents=format_documents(docs), **fields)
    try:
        session.plan(session.count(prompt))
    except DoesNotFitError as exc:
        reason = exc.message.split(";")[0]  # what is over; the advice that follows does not apply here
        reporter.status(f"the input does not fit in one pass ({reason}); summarizing it by map-reduce")
        run = _MapReduce(session, docs, fields, sources, reporter, on_text)
        try:
            return run.run()
        except KeyboardInterrupt:  # between or inside steps before the final one: a partial result
            return run.interrupted()
    result = session.run(prompt, sources, on_text=on_text)
    result.plan = SummaryPlan(mode="single", pieces=1, levels=1)
    return result


class _MapReduce:
    """One map-reduce run: pieces, their summaries level by level, and every step's result."""

    def __init__(
        self,
        session: Backend,
        docs: list[Document],
        fields: dict[str, str],
        sources: list[Source],
        reporter: Reporter,
        on_text: OnText | None,
    ) -> None:
        self.session = session
        self.docs = docs
        self.fields = fields
        self.sources = sources
        self.reporter = reporter
        self.on_text = on_text
        self.final_new = session.cfg.generation.max_new_tokens
        self.step_new = step_tokens(self.final_new)
        self.results: list[Result] = []
        self.pieces = 0  # known once planned
        self.level = 0  # the level running now

    def interrupted(self) -> Result:
        """The result of a run stopped by Ctrl-C before its final step finished streaming: the answer is
        empty (nothing was shown), counts and timings cover the steps that ran, ``interrupted`` is set."""
        if self.results:
            result = self.result("", self.pieces, self.level)
        else:
            result = self.session.empty(self.sources)
            result.plan = SummaryPlan(mode="map-reduce", pieces=self.pieces, levels=self.level, steps=0)
        result.interrupted = True
        return result

    def run(self) -> Result:
        budget = self.context_budget()
        count = self.session.count
        # map instructions: a word limit that the step's token cap leaves room for
        map_fields = {"length_instruction": f"Use at most {max(20, int(self.step_new * 0.6))} words."}
        overhead = count(render(self.session.tokenizer, "map", documents="", part="999", parts="999", **map_fields))
        piece_budget = budget - self.step_new - overhead - SAFETY_TOKENS
        if piece_budget < MIN_PIECE_TOKENS:
            raise DoesNotFitError(
                f"a context of {budget:,} tokens leaves {max(0, piece_budget)} tokens of text per piece after the "
                f"prompt ({overhead} tokens) and {self.step_new} summary tokens; raise --max-context"
            )
        pieces = make_pieces(self.docs, piece_budget, count)
        if len(pieces) == 1:  # fits a map prompt but not the summarize prompt with the full answer budget: halve
            size = count(format_documents(pieces[0]))
            pieces = make_pieces(self.docs, max(MIN_PIECE_TOKENS, size // 2 + 1), count)
        n = self.pieces = len(pieces)
        self.level = 1
        self.reporter.status(
            f"map-reduce plan: {n} pieces of at most {piece_budget:,} tokens of text; "
            f"level 1 summarizes each piece, then levels of combining until one summary is left"
        )
        prompts = [
            render(
                self.session.tokenizer,
                "map",
                documents=format_documents(piece),
                part=str(k),
                parts=str(n),
                **map_fields,
            )
            for k, piece in enumerate(pieces, start=1)
        ]

        def summarize_piece(k: int) -> str:
            self.reporter.status(f"level 1: summarizing piece {k + 1}/{n} ({_where(pieces[k])})")
            return self.step(prompts[k], self.step_new, None)

        summaries = self.session.map(summarize_piece, range(n))
        level = 1
        reduce_overhead = count(render(self.session.tokenizer, "reduce", documents="", **self.fields))
        while True:
            level += 1
            self.level = level
            final_budget = budget - self.final_new - reduce_overhead - SAFETY_TOKENS
            if count(reduce_text(summaries)) <= final_budget or len(summaries) == 1:
                self.reporter.status(f"level {level}: combining {len(summaries)} summaries into the final summary")
                prompt = render(self.session.tokenizer, "reduce", documents=reduce_text(summaries), **self.fields)
                final = self.step(prompt, self.final_new, self.on_text, final=True)
                return self.result(final, n, level)
            groups = group_summaries(summaries, budget - self.step_new - reduce_overhead - SAFETY_TOKENS, count)
            if len(groups) == 1 and len(summaries) > 2:
                # all fit one step's prompt but not the final one's (longer answer): combine in two
                # halves, so that the final step still sees more than one summary
                half = len(summaries) // 2
                groups = [list(range(half)), list(range(half, len(summaries)))]
            if len(groups) >= len(summaries):
                raise DoesNotFitError(
                    f"a context of {budget:,} tokens cannot hold two partial summaries of up to {self.step_new} tokens "
                    "plus the prompt; raise --max-context or lower --max-new-tokens"
                )
            self.reporter.status(f"level {level}: combining {len(summaries)} summaries in {len(groups)} groups")
            summaries = self.session.map(partial(self.combine, summaries, groups), range(len(groups)))

    def combine(self, summaries: list[str], groups: list[list[int]], g: int) -> str:
        """The summary of group ``g`` of ``summaries`` at this level (a group of one is kept as it is)."""
        group = groups[g]
        if len(group) == 1:
            return summaries[group[0]]
        self.reporter.status(
            f"level {self.level}: combining summaries {group[0] + 1}-{group[-1] + 1} (group {g + 1}/{len(groups)})"
        )
        prompt = render(
            self.session.tokenizer,
            "reduce",
            documents=reduce_text([summaries[i] for i in group], group[0], len(summaries)),
            **self.fields,
        )
        return self.step(prompt, self.step_new, None)

    def context_budget(self) -> int:
        """The context one step may use: --max-context (or the model's ceiling), halved until memory fits."""
        new = self.session.cfg.generation.max_new_tokens
        # raises the explanatory error when not even a one-token prompt fits (answer budget, weights)
        budget = self.session.plan(1).max_context
        while budget > new + MIN_PIECE_TOKENS:
            if _fits(self.session, budget - new):
                return int(budget)
            budget //= 2
        raise DoesNotFitError("not enough memory for even a small piece of the input; try --dtype bfloat16")

    def step(self, prompt: Prompt, max_new: int, on_text: OnText | None, final: bool = False) -> str:
        # map and reduce prompts are not reused across runs: only one-pass plans use the document cache
        result = self.session.run(prompt, self.sources, on_text, cache=False, max_new_tokens=max_new)
        self.results.append(result)
        if result.interrupted and not final:
            raise KeyboardInterrupt  # nothing was shown yet: stop the whole run
        text = result.answer
        return text if final or result.generated_tokens < max_new else complete_sentences(text)

    def result(self, final_text: str, pieces: int, levels: int) -> Result:
        """The final step's result with counts and timings summed over every step."""
        result = Result.merge(self.results, final_text)
        result.plan = SummaryPlan(mode="map-reduce", pieces=pieces, levels=levels, steps=len(self.results))
        return result


def step_tokens(final_new: int) -> int:
    """The token cap of map and intermediate reduce steps for a final answer of ``final_new`` tokens."""
    return min(final_new, MAP_MAX_NEW_TOKENS, max(MAP_MIN_NEW_TOKENS, final_new // 2))


def complete_sentences(text: str) -> str:
    """A partial summary cut off at its token cap, without its unfinished last sentence.

    A dangling fragment ("... the prototype (serial HX-") makes a small model copy that summary
    instead of combining; the text is kept whole when the fragment is most of it (over 70%).
    Lines count as complete too (bulleted summaries have no periods).
    """
    ends = [m.end() for m in re.finditer(r"[.!?][\"'\u201d\u2019)\]]*(?=\s|$)", text)]
    ends = [e for e in ends if not _ends_with_abbreviation(text[:e])]
    ends = sorted(ends + [m.start() for m in re.finditer(r"\n", text.rstrip())])  # complete lines (bullets)
    if ends and ends[-1] >= 0.3 * len(text.rstrip()):
        return text[: ends[-1]]
    return text


def _fits(session: Backend, prompt_tokens: int) -> bool:
    try:
        session.plan(prompt_tokens)
    except DoesNotFitError:
        return False
    return True


def _where(piece: list[Document]) -> str:
    """Where a piece starts and ends, by citation labels: "report.pdf p. 2-p. 3"."""
    first, last = piece[0], piece[-1]
    start = f"{first.source} {first.segments[0][0]}" if first.kind != "text" else first.source
    end_label = last.segments[-1][0] if last.kind != "text" else last.source
    same = first is last and first.segments[0][0] == last.segments[-1][0]
    return start if same else f"{start} .. {end_label}"

"""The runs of one ``summarize`` command: every input together, or each on its own (``--each``), sharing
one loaded model (or one connection to --endpoint). With ``--each --concurrency N`` (through --endpoint)
inputs are read here one after the other and summarized up to N at once.

``--each`` keeps its own small pool rather than ``Backend.map``: map returns when every item is done,
and ``--each`` prints each summary as soon as it and those before it are done, reads the next input
while others run, and gives the input a Ctrl-C cut short a line of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from longdoc import errors
from longdoc.cli import output
from longdoc.cli.interrupts import RunState, partial_result
from longdoc.cli.options import Given
from longdoc.cli.settings import Settings, open_backend

if TYPE_CHECKING:
    from concurrent.futures import Future

    from longdoc.ingest import Document
    from longdoc.render import Reporter
    from longdoc.runtime.backend import Backend
    from longdoc.runtime.result import Result


class Summaries:
    """The summaries of one command line (``style`` and ``max_words`` are --style and --max-words)."""

    def __init__(self, reporter: Reporter, run: Settings, given: Given, style: str, max_words: int | None) -> None:
        self.reporter = reporter
        self.settings = run
        self.given = given
        self.style = style
        self.max_words = max_words
        self.session: Backend | None = None

    def open(self) -> Backend:
        self.session = self.session or open_backend(self.settings, self.reporter)
        return self.session

    def read(self, paths: list[str]) -> tuple[list[Document], float]:
        return output.read_inputs(self.reporter, paths, self.given, self.settings.budget)

    def run(self, docs: list[Document], ingest_s: float, on_text: Callable[[str], None] | None = None) -> Result:
        from longdoc.tasks.citations import extract_citations
        from longdoc.tasks.summarize import summarize as summarize_docs

        result = summarize_docs(self.open(), docs, self.style, self.max_words, self.reporter, on_text=on_text)
        output.add_reading(result, ingest_s, extract_citations(result.answer, docs))
        return result

    def summarize(self, paths: list[str], state: RunState) -> Result:
        """Read ``paths``, load the model once, summarize; ``state`` follows the stages for Ctrl-C."""
        state.stage = "ingest"
        docs, ingest_s = self.read(paths)
        state.stage = "load"
        state.model = self.open().name
        state.stage = "generate"
        result = state.result = self.run(docs, ingest_s, on_text=self.reporter.stream)
        return result

    def together(self, paths: list[str], state: RunState) -> None:
        output.finish(self.reporter, self.summarize(paths, state))

    def each(self, paths: list[str]) -> list[int]:
        """``--each``: the exit codes of the inputs that failed without stopping the batch."""
        if self.given.concurrency > 1:
            return self.each_at_once(paths)
        return [code for path in paths if (code := self.one_of_each(path)) is not None]

    def one_of_each(self, path: str) -> int | None:
        """Summarize one input of ``--each``: its JSON line (or streamed text); the exit code of a
        failure that should not stop the batch, or None. Ctrl-C gives the input a line marked
        ``interrupted`` (lines already out stay) and ends the batch with 130."""
        state = RunState()
        try:
            self.reporter.status(f"summarizing {path}")
            result = self.summarize([path], state)
        except (errors.InputError, errors.DoesNotFitError) as exc:
            return output.failed(self.reporter, path, exc)
        except KeyboardInterrupt:
            result = partial_result(state)
        output.each_line(self.reporter, path, result)
        return None

    def each_at_once(self, paths: list[str]) -> list[int]:
        """``--each`` with ``--concurrency N`` (through --endpoint): inputs are read here, one after the
        other, and summarized up to N at once in threads; each summary is printed whole, in input order."""
        from collections import deque
        from concurrent.futures import Future, ThreadPoolExecutor

        concurrency = self.given.concurrency
        failures: list[int] = []
        waiting: deque[tuple[str, Future[Result]]] = deque()
        here = (paths[0], "load")  # what this thread does (a Ctrl-C with nothing waiting cuts it): path, stage
        pool = ThreadPoolExecutor(concurrency, thread_name_prefix="longdoc-each")
        try:
            self.open()  # connect once, before any thread starts
            for path in paths:
                here = (path, "ingest")
                self.reporter.status(f"summarizing {path}")
                work: Future[Result]
                try:
                    docs, ingest_s = self.read([path])
                    work = pool.submit(self.run, docs, ingest_s)
                except errors.InputError as exc:
                    work = Future()
                    work.set_exception(exc)
                waiting.append((path, work))
                while waiting and (len(waiting) >= concurrency or waiting[0][1].done()):
                    self.finish_each(*waiting[0], failures)
                    waiting.popleft()  # only now: a Ctrl-C while it was awaited gives it the interrupted line
            while waiting:
                self.finish_each(*waiting[0], failures)
                waiting.popleft()
        except KeyboardInterrupt:
            if self.session is not None:
                self.session.stop()
            if waiting:  # the first input not printed yet gets the interrupted line
                here = (waiting[0][0], "generate")
            output.each_line(self.reporter, here[0], partial_result(RunState(stage=here[1])))
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        return failures

    def finish_each(self, path: str, work: Future[Result], failures: list[int]) -> None:
        try:
            result = work.result()
        except (errors.InputError, errors.DoesNotFitError) as exc:
            failures.append(output.failed(self.reporter, path, exc))
            return
        if not self.reporter.json_mode:  # summaries made side by side are printed whole, not streamed
            self.reporter.stream(result.answer)
        output.each_line(self.reporter, path, result)

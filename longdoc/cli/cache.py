"""``longdoc cache``: the document KV cache, prefilled documents kept across runs (``ls``, ``clear``)."""

from __future__ import annotations

import sys
import time

from longdoc.cli import options as o
from longdoc.cli.command import takes
from longdoc.cli.interrupts import handled


@takes("json_out")
def ls(*, given: o.Given) -> None:
    """Entries with their sizes, last use, token counts and source paths (most recent first)."""
    from longdoc.render import Reporter, console, human_bytes, plain

    reporter = Reporter(json_mode=given.json_out)
    with handled(reporter):
        from rich.table import Table

        from longdoc.runtime import doccache
        from longdoc.runtime.result import json_of
        from longdoc.store import documents_dir

        rows = doccache.entries()
        total = sum(r.bytes for r in rows)
        if given.json_out:
            reporter.json({"entries": json_of(rows), "folder": str(documents_dir()), "bytes": total})
            return
        out = console(sys.stdout)
        table = Table("key", "size", "used", "tokens", "model", "sources")
        now = time.time()
        for r in rows:
            table.add_row(
                r.key[:12],
                human_bytes(r.bytes),
                f"{age(now - r.used)} ago",
                f"{r.tokens:,}",
                plain(r.model),
                plain(", ".join(r.sources) if r.valid else "(unreadable header)"),
            )
        out.print(table)
        out.print(plain(f"{len(rows)} entries, {human_bytes(total)} in {documents_dir()}"))


@takes("json_out")
def clear(*, given: o.Given) -> None:
    """Delete every entry of the document KV cache (converted models stay)."""
    from longdoc.render import Reporter, console, human_bytes

    reporter = Reporter(json_mode=given.json_out)
    with handled(reporter):
        from longdoc.runtime import doccache

        count, size = doccache.clear()
        if given.json_out:
            reporter.json({"removed": count, "bytes": size})
        else:
            console(sys.stdout).print(f"removed {count} entries ({human_bytes(size)})")


def age(seconds: float) -> str:
    for unit, span in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= span:
            return f"{seconds / span:.0f} {unit}"
    return f"{seconds:.0f} s"

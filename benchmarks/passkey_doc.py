"""A real-text pass-key document for `longdoc ask`: the first N tokens of the shared corpus, without the
lines that mention pass keys (the papers' own examples would mislead), with the passkey eval's key
sentence planted at a depth.

    python -m benchmarks.passkey_doc /tmp/e2e/corpus32k_passkey2.txt --tokens 31500 --key 71946 --depth 0.5
    longdoc ask /tmp/e2e/corpus32k_passkey2.txt "What is the pass key? Answer with the number only." --json
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from benchmarks.common import corpus_text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--tokens", type=int, default=31500)
    parser.add_argument("--key", type=int, default=71946)
    parser.add_argument("--depth", type=float, default=0.5)
    args = parser.parse_args(argv)

    from longdoc.config import RunConfig
    from longdoc.evals import passkey
    from longdoc.render import Reporter
    from longdoc.runtime.local import LocalBackend

    session = LocalBackend(RunConfig(doc_cache=False), Reporter(quiet=True))
    text = "\n".join(line for line in corpus_text().splitlines() if not re.search(r"pass ?key", line, re.I))
    ids = session.encode(text)[: args.tokens]
    cut = int(len(ids) * args.depth)
    body = session.tokenizer.decode(ids[:cut]) + passkey.sentence(args.key) + session.tokenizer.decode(ids[cut:])
    args.out.write_text(body)
    print(f"{args.out}: {len(session.encode(body)):,} tokens, key {args.key} at depth {args.depth}")


if __name__ == "__main__":
    main()

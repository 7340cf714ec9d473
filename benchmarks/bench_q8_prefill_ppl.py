"""Perplexity of q8's prefill model: ``longdoc eval ppl --quantize q8`` as it is, but without
``schemes.every_row``, so every position runs the path a real run's prefill takes (the q8 gemm on int16
activations and the fused silu(gate) * up where its AVX2 loop runs, else the Q8_0 weights unpacked)
rather than the decode matmul on int8 activations, which is what ``eval ppl --quantize q8`` measures.
Arguments after the script's name are ``longdoc eval ppl``'s; prints its JSON.

    python -m benchmarks.bench_q8_prefill_ppl ../shared/corpus --lengths 4096,16384 --no-dca --json
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from longdoc.quant import schemes


@contextlib.contextmanager
def as_it_is(model: object) -> Iterator[None]:
    """``every_row`` that leaves each layer's own choice of path."""
    yield


def main() -> None:
    schemes.every_row = as_it_is  # type: ignore[assignment]  # ppl reads it from the module at each call
    from longdoc.cli import main as cli

    sys.argv = ["longdoc", "eval", "ppl", *sys.argv[1:], "--quantize", "q8"]
    cli()


if __name__ == "__main__":
    main()

"""Developer tools, not tests and not part of the package: the mutant runner (``python tools/mutants.py``)
and the fuzz and fault harnesses (``python -m tools.fuzz.run``). Run them from the repository root."""

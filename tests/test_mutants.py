"""The deliberate breaks of tools/mutants.py still apply: each names a file and a text that must occur
there exactly once, so a refactor that moves or rewrites one fails here, not hours into a mutant run."""

from __future__ import annotations

from tools.mutants import MUTANTS, broken


def test_every_mutant_still_applies():
    assert broken(MUTANTS) == []


def test_names_are_unique():
    names = [name for name, *_ in MUTANTS]
    assert len(names) == len(set(names))


def test_a_moved_anchor_or_a_no_op_is_reported():
    assert broken([("gone", "longdoc/cpu.py", "text that is not there", "x")]) == [
        "'gone': its original text occurs 0 times in longdoc/cpu.py, not once"
    ]
    assert broken([("same", "longdoc/cpu.py", "    cap = isa_cap()\n", "    cap = isa_cap()\n")]) == [
        "'same': the mutated longdoc/cpu.py equals the original"
    ]
    assert broken([("lost", "longdoc/nowhere.py", "x", "y")]) == ["'lost': no file longdoc/nowhere.py"]

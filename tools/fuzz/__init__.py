"""Seeded fuzz and fault harnesses for ingestion, the CLI, the model cache and ``longdoc serve`` (issues 10
and 27); see run.py. tests/test_fuzz_slice.py and tests/test_serve_faults_slice.py run fixed slices."""

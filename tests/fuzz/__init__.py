"""A seeded fuzz and fault harness for ingestion and the CLI (issue 10); see run.py."""

"""Prefill, decode and sampling over the model adapter and its KV store."""

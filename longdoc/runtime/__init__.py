"""One run on one machine: what it gets here, its plan, the document cache, and the backends that run
a prompt (the local model, or a remote OpenAI-compatible endpoint)."""

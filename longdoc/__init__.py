"""longdoc: question answering and summarization over documents far longer than a small model's window."""

__version__ = "0.1.0"

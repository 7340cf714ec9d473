"""longdoc: question answering and summarization over documents far longer than a small model's window."""

__version__ = "0.1.0"

# LONGDOC_ISA caps torch's kernels too, which read their variables once, when torch loads
from longdoc import cpu as _cpu  # noqa: E402

_cpu.apply_torch_cap()

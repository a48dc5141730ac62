"""See inside a model: traces of named intermediate tensors, diffs against another run or llama.cpp,
the logit lens, a file check, and planted faults that prove the diff finds where a bug enters."""
from .diff import DiffReport, diff
from .trace import Trace, injected, record

__all__ = ["Trace", "record", "injected", "diff", "DiffReport"]

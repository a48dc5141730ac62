"""A dependency-free progress bar on stderr, shown only on a terminal."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, desc: str = "", enabled: bool | None = None):
        self.total, self.desc, self.n = max(int(total), 1), desc, 0
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.t0 = self._last = time.perf_counter()

    def update(self, k: int = 1, note: str = "") -> None:
        self.n += k
        now = time.perf_counter()
        if not self.enabled or (now - self._last < 0.1 and self.n < self.total):
            return
        self._last = now
        frac = min(self.n / self.total, 1.0)
        bar = "#" * int(frac * 30)
        sys.stderr.write(f"\r{self.desc} [{bar:<30}] {self.n}/{self.total} {now - self.t0:.1f}s {note}\x1b[K")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

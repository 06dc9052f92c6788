"""A plain-text progress bar, no dependency.

    [#####---------------] 12/30 bwd 1x8x1024x64 bf16  0:45

On a terminal the line is rewritten in place (\\r); otherwise (a log file, a pipe) each step is
printed on its own line. It goes to stderr, so stdout carries only the results.
"""

from __future__ import annotations

import sys
import time


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes}:{seconds:02d}"


class Progress:
    def __init__(self, total: int, stream=None, width: int = 20):
        self.total = max(total, 1)
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.perf_counter()
        self.done_steps = 0
        self._last_length = 0

    def bar(self, done: int) -> str:
        filled = round(self.width * done / self.total)
        return "[" + "#" * filled + "-" * (self.width - filled) + "]"

    def _write(self, line: str, final: bool = False) -> None:
        if self.tty:
            padding = " " * max(0, self._last_length - len(line))
            self.stream.write("\r" + line + padding + ("\n" if final else ""))
            self._last_length = 0 if final else len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def step(self, text: str) -> None:
        """Announces the next step (`text`); the bar shows the steps finished before it."""
        elapsed = _clock(time.perf_counter() - self.start)
        self._write(f"{self.bar(self.done_steps)} {self.done_steps + 1}/{self.total} {text}  {elapsed}")
        self.done_steps += 1

    def finish(self) -> None:
        elapsed = _clock(time.perf_counter() - self.start)
        self._write(f"{self.bar(self.total)} {self.done_steps}/{self.total} done in {elapsed}", final=True)

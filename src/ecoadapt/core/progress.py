"""Progress display: a tqdm bar on a terminal, plain log lines when not a TTY (CI, files)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm


def fmt_duration(seconds: float) -> str:
    """Seconds as H:MM:SS."""
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    """Step progress with loss, tokens/s and the time left."""

    def __init__(self, total: int, label: str = "train", stream: TextIO | None = None) -> None:
        self.total = total
        self.label = label
        self.stream = stream or sys.stderr
        self.start = time.perf_counter()
        self.bar = tqdm(total=total, desc=label, file=self.stream, unit="step") if self.stream.isatty() else None

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        """Report that ``step`` of ``total`` is done."""
        elapsed = time.perf_counter() - self.start
        eta = elapsed / step * (self.total - step) if step else 0.0
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}")
            self.bar.refresh()
        else:
            print(
                f"[{self.label}] step {step}/{self.total}  loss {loss:.4f}  "
                f"{tokens_per_s:,.0f} tok/s  elapsed {fmt_duration(elapsed)}  eta {fmt_duration(eta)}",
                file=self.stream,
                flush=True,
            )

    def close(self) -> None:
        """Finish the bar."""
        if self.bar is not None:
            self.bar.close()


def say(message: str, stream: TextIO | None = None) -> None:
    """One line of run narration on stderr (stdout stays for results)."""
    print(message, file=stream or sys.stderr, flush=True)

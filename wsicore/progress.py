"""Progress of long work: a tqdm bar where a terminal is attached, plain lines where output goes to a log.

Snakemake jobs write to log files, where a bar's carriage returns would be noise: there every update that
carries information (or, without any, one every `every_s` seconds) becomes one line such as

    stage 2: step 120/400 (30%), loss 1.234, lr 1.9e-05, 5,210 tokens/s, 0.85 steps/s, ETA 5m29s
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


def format_duration(seconds: float) -> str:
    """`3725` -> `1h02m`, `65` -> `1m05s`, `7.2` -> `7s`."""
    s = max(0, round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.4g}"
    return str(v)


class Progress:
    """`total` units of work from `initial` on (a resumed run), reported to `stream` (default stderr)."""

    def __init__(self, total: int, what: str, unit: str = "it", initial: int = 0, stream: TextIO | None = None,
                 every_s: float = 30.0, enabled: bool = True) -> None:
        self.total, self.what, self.unit, self.done = total, what, unit, initial
        self.stream = stream or sys.stderr
        self.every_s, self.enabled = every_s, enabled
        self.start_done, self.t0 = initial, time.perf_counter()
        self.last_line = self.t0
        self.bar = None
        if enabled and self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=what, unit=unit, file=self.stream, dynamic_ncols=True)

    def eta_s(self) -> float | None:
        """Seconds left at the rate of this run so far (None before the first unit)."""
        n = self.done - self.start_done
        return (time.perf_counter() - self.t0) / n * (self.total - self.done) if n > 0 else None

    def line(self, info: dict[str, Any]) -> str:
        elapsed = time.perf_counter() - self.t0
        n = self.done - self.start_done
        parts = [f"{self.what}: {self.unit} {self.done:,}/{self.total:,}"
                 + (f" ({100 * self.done / self.total:.0f}%)" if self.total else "")]
        parts += [f"{k.replace('_', ' ')} {_value(v)}" for k, v in info.items()]
        if n > 0 and elapsed > 0:
            parts.append(f"{n / elapsed:.3g} {self.unit}s/s")
        eta = self.eta_s()
        if eta is not None and self.done < self.total:
            parts.append(f"ETA {format_duration(eta)}")
        elif self.done >= self.total:
            parts.append(f"done in {format_duration(elapsed)}")
        return ", ".join(parts)

    def update(self, n: int = 1, **info: Any) -> None:
        """`n` more units done; `info` (loss=..., slide=...) is shown with them."""
        self.done += n
        if not self.enabled:
            return
        if self.bar is not None:
            if info:
                self.bar.set_postfix({k: _value(v) for k, v in info.items()}, refresh=False)
            self.bar.update(n)
            return
        now = time.perf_counter()
        if info or self.done >= self.total or now - self.last_line >= self.every_s:
            print(self.line(info), file=self.stream, flush=True)
            self.last_line = now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

"""Ctrl-C for the command-line scripts, kept even where Python drops it.

Python runs a signal's handler wherever the main thread is; if that is inside a gc callback (JAX registers one), the
callback's KeyboardInterrupt is printed as "Exception ignored ..." and dropped, and the program goes on as if never
interrupted. ``Interrupts`` raises KeyboardInterrupt as Python's own handler does, but also keeps each signal, so the
script honours a dropped one at its next step (``check``), and keeps dropped KeyboardInterrupts out of the output.
Standard library only: installed before JAX is imported.
"""

from __future__ import annotations

import signal
import sys


class Interrupts:
    def __init__(self):
        self.signals: list[int] = []  # every signal handled, in order

    def install(self) -> Interrupts:
        """Handle SIGINT here, and drop KeyboardInterrupts from "Exception ignored" output (others still print)."""
        signal.signal(signal.SIGINT, self._interrupt)
        default = sys.unraisablehook

        def unraisable(u) -> None:
            if not isinstance(u.exc_value, KeyboardInterrupt):
                default(u)

        sys.unraisablehook = unraisable
        return self

    def keep(self, sig: int, _frame=None) -> None:
        """A handler that only keeps the signal (while another part, e.g. uvicorn, decides what it does)."""
        self.signals.append(sig)

    def _interrupt(self, sig: int, frame) -> None:
        self.keep(sig)
        raise KeyboardInterrupt

    def check(self) -> None:
        """Raise KeyboardInterrupt if a Ctrl-C came (its own KeyboardInterrupt may have been dropped)."""
        if signal.SIGINT in self.signals:
            raise KeyboardInterrupt

"""SIGINT/SIGTERM during training: the first asks the loop to stop after the current step (it saves a
checkpoint); a second SIGINT exits at once."""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType, TracebackType


class StopRequests:
    """Context manager that turns the first SIGINT/SIGTERM into a flag the loop polls (`requested`)."""

    def __init__(self, announce: bool = True) -> None:
        self.requested = False
        self.announce = announce  # print what happens (one process of several stays quiet)
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():  # signals can only be caught there
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self.requested = True
        if not self.announce:
            return
        name = signal.Signals(signum).name
        print(
            f"\n{name}: stopping after this step and saving a checkpoint (Ctrl-C again to quit at once)",
            file=sys.stderr,
            flush=True,
        )

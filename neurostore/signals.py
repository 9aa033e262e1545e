"""How long work stops. SIGTERM (a batch scheduler's time limit, `kill`) ends a command as Ctrl-C
does, cleaning up on the way out, instead of killing it on the spot; and a pass over images
stops at the end of the batch in hand, so that its state can be saved whole.

Python lets only the main thread set signal handlers; elsewhere both keep their defaults."""
from __future__ import annotations

import contextlib
import signal
import threading


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def sigterm_exits(exception: "type[BaseException] | None" = None):
    """SIGTERM raises SystemExit(143) where the work is, so `finally` blocks and handlers run; or
    `exception()`, for a caller that ends on it as on Ctrl-C (the web server, with exit 0)."""
    def stop(signum, frame):
        raise exception() if exception is not None else SystemExit(128 + signum)

    if not _main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class StopAtBatchEnd:
    """Ctrl-C or SIGTERM during a loop over batches only asks it to stop (`asked`): the loop
    finishes the batch in hand, saves its state (which, taken mid-batch, would be half-updated)
    and raises `stop()`. A second signal stops at once (`now`), as it would have without this."""

    def __init__(self):
        self.asked: int | None = None
        self.now = False
        self.old: dict = {}

    def _ask(self, signum, frame) -> None:
        if self.asked is not None:
            self.now = True
            raise self._exception(signum)
        self.asked = signum

    @staticmethod
    def _exception(signum: int) -> BaseException:
        return KeyboardInterrupt() if signum == signal.SIGINT else SystemExit(128 + signum)

    def stop(self) -> BaseException:
        """What the loop raises once its state is saved: what the signal would have raised."""
        return self._exception(self.asked)

    def __enter__(self) -> "StopAtBatchEnd":
        if _main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self.old[s] = signal.signal(s, self._ask)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.old.items():
            signal.signal(s, handler)

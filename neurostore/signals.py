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


# Runs that committed while a stop signal was held (`held`): the CLI's last words name them, since
# "nothing of this command was kept" would then be untrue.
COMMITTED_WHILE_STOPPING: list[str] = []


@contextlib.contextmanager
def held():
    """Ctrl-C and SIGTERM wait for the end of the block, then stop as they would have (a store's
    commit: stopped between its manifest swap and its end, a run was committed yet reported and
    recorded as failed). A second signal stops at once. A signal the process ignores (a job
    started with `&` ignores Ctrl-C) stays ignored. Yields the list of signals held."""
    got: list[int] = []
    if not _main_thread():
        yield got
        return

    def hold(signum, frame):
        if got:
            raise StopAtBatchEnd._exception(signum)
        got.append(signum)

    old = {}
    for s in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(s) is not signal.SIG_IGN:
            old[s] = signal.signal(s, hold)
    try:
        yield got
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    if got:
        previous = old[got[0]]
        if callable(previous):   # the handler the signal would have met (e.g. sigterm_exits')
            previous(got[0], None)
        raise StopAtBatchEnd._exception(got[0])

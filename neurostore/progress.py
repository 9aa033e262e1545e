"""Progress bars on stderr (stdout stays a command's one JSON object), one kind for every stage.

On a terminal they are tqdm's own. In a log (CI, `2> file`) tqdm would rewrite its line on every
update and, where bars run at once (a world build trains networks side by side), move the cursor
with escape codes that a log shows as `[A` litter: there each bar keeps to its own line
(position 0) and updates at most every LOG_INTERVAL seconds."""
from __future__ import annotations

import sys
from collections.abc import Iterable

LOG_INTERVAL = 30.0   # seconds between a bar's updates in a log


def bar(total: int | None, desc: str, unit: str = "it", enabled: bool = True, initial: int = 0,
        items: Iterable | None = None):
    """A tqdm bar (over `items`, if given); enabled=False gives one whose update and close do
    nothing."""
    from tqdm import tqdm

    log = {} if _is_terminal() else {"position": 0, "mininterval": LOG_INTERVAL}
    return tqdm(items, total=total, desc=desc, unit=unit, initial=initial, disable=not enabled, leave=False,
                dynamic_ncols=True, **log)


def _is_terminal() -> bool:
    if "ipykernel" in sys.modules:   # a notebook draws the bar in place
        return True
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):   # replaced or closed stderr
        return False

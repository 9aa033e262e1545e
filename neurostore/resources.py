"""Where the package's SQL lives: the repository's top-level `schema/` and `queries/` folders (the
single source of truth a reader opens first), shipped inside the wheel as `neurostore/_sql/<name>/`.

An installed wheel finds them as package data; a source checkout (editable install, tests) reads the
repository folders, so an edit there is seen at once."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent


def sql_dir(name: str) -> Path:
    """The folder of `schema` or `queries` SQL files."""
    if name not in ("schema", "queries"):
        raise ValueError(f"no SQL folder named {name!r}")  # a developer's bug: the names are fixed
    shipped = resources.files("neurostore") / "_sql" / name
    if shipped.is_dir():
        return Path(str(shipped))
    return _REPO / name

"""Every error neurostore raises on purpose. The CLI catches `NeurostoreError` in one place and
prints `Error: <message>` (exit 1); any other exception is a bug and keeps its traceback.

A message says what went wrong, what is valid, and what to do. The API's messages speak of its
arguments (`store=PATH`, `params={'top': 50}`, `units='conv4:3'`, `overwrite=True`); `cli_message`
turns them into the CLI's flags, so `Error:` lines name what the user types."""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable


class NeurostoreError(Exception):
    """Base class of every error the API raises on purpose."""


class StoreNotFound(NeurostoreError):
    pass


class SchemaMismatch(NeurostoreError):
    pass


class StoreVersionError(NeurostoreError):
    pass


class StoreDamaged(NeurostoreError):
    """The store's files and its manifest disagree (a file missing, truncated or corrupt) or its
    manifest.json / store.json is unreadable; `neurostore check --repair` fixes it."""


class UnknownTable(NeurostoreError):
    pass


class UnknownQuery(NeurostoreError):
    pass


class MissingParameter(NeurostoreError):
    pass


class BadParameter(NeurostoreError):
    pass


class QueryError(NeurostoreError):
    """SQL that DuckDB rejected, or that the guard refused."""


class UnknownModel(NeurostoreError):
    pass


class UnknownLayer(NeurostoreError):
    pass


class UnknownEncoder(NeurostoreError):
    pass


class UnknownVocabulary(NeurostoreError):
    pass


class UnknownScorer(NeurostoreError):
    pass


class BadInput(NeurostoreError):
    """A file, folder or value given by the user that cannot be used."""


class LLMError(NeurostoreError):
    pass


def did_you_mean(name: str, valid: Iterable[str], n: int = 3) -> str:
    """' Did you mean a, b?' for the closest valid names, or '' when none is close."""
    close = difflib.get_close_matches(name, list(valid), n=n, cutoff=0.5)
    return f" Did you mean {', '.join(close)}?" if close else ""


def unknown(kind: str, name: str, valid: Iterable[str], hint: str = "") -> str:
    """Message for an unknown name: what was asked, the close matches, and the valid names."""
    valid = sorted(valid)
    shown = ", ".join(valid[:20]) + (f", … ({len(valid)} in all)" if len(valid) > 20 else "")
    msg = f"Unknown {kind} '{name}'.{did_you_mean(name, valid)}"
    msg += f" Valid: {shown}." if valid else f" There are no {kind}s yet."
    return msg + (f" {hint}" if hint else "")


def listed(value, name: str) -> list | None:
    """An API argument that takes several names (layers, models, scorers, files): None stays None
    (the default); one name, path or number is a list of one (a bare string was read a character
    at a time: "layer4" as layers 'l', 'a', ...); an empty list is refused (it silently meant
    every one)."""
    if value is None:
        return None
    if isinstance(value, (str, bytes, os.PathLike, int)):
        return [value]
    try:
        out = list(value)
    except TypeError:
        raise BadParameter(f"{name}={value!r} must be a name or a list of names.") from None
    if not out:
        raise BadParameter(f"{name}=[] is empty: give at least one, or leave {name} out for the default.")
    return out


# An argument as the API's messages write it -> the flag the CLI takes for it.
_ARG_AS_FLAG = [
    (re.compile(r"params=\{'(\w+)': ([^}]*)\}"), r"--param \1=\2"),
    (re.compile(r"\bstore=PATH\b"), "--store PATH"),
    (re.compile(r"\boverwrite=True\b"), "--overwrite"),
    (re.compile(r"\bunits='([^']*)'"), r"--units \1"),
    (re.compile(r"\bmax_images=(-?\d+)"), r"--max-images \1"),
    (re.compile(r"\bk=(-?\d+)"), r"--k \1"),
    (re.compile(r"\btop_n=(-?\d+)"), r"--top \1"),
    (re.compile(r"\bbatch_size=(-?\d+)"), r"--batch-size \1"),
    (re.compile(r"\bworkers=(-?\d+)"), r"--workers \1"),
    (re.compile(r"(?<!--param )\btop=(-?\d+)"), r"--top \1"),   # (a named query's --param top=50 stays)
    (re.compile(r"(?<!--param )\b(min_similarity|min_confidence|top_units|verify_top|threshold)=(-?[\d.e+-]+)"),
     lambda m: f"--{m.group(1).replace('_', '-')} {m.group(2)}"),
    (re.compile(r"methods=\['(\w+)', '(\w+)'\]"), r"--method \1 --method \2"),
    (re.compile(r"\bsummarise_with names\b"), "--summarise names"),
]


def cli_message(error: NeurostoreError) -> str:
    """`error`'s message with the API's argument names written as CLI flags."""
    msg = str(error)
    for pattern, flag in _ARG_AS_FLAG:
        msg = pattern.sub(flag, msg)
    return msg

"""Named queries: `queries/<name>.sql`, the file stem is the name (like OpenCLIP's model configs).

A header of `--` lines declares the query:

    -- title: Concept to neurons
    -- description: Units whose top concepts include a concept, across models and layers.
    -- param concept VARCHAR: the concept word
    -- param top INTEGER = 50: how many units

and the SQL uses `$concept`, `$top`. Values are converted to the declared type and always bound
by DuckDB, never formatted into the SQL. Files whose name starts with '_' are not queries
(`_macros.sql` holds the macros every connection gets).
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb

from .resources import sql_dir
from .errors import BadParameter, MissingParameter, QueryError, UnknownQuery, did_you_mean, unknown

QUERIES_DIR = sql_dir("queries")

_PARAM_RE = re.compile(r"^--\s*param\s+([A-Za-z_]\w*)\s+([A-Za-z]+)(?:\s*=\s*(.*?))?\s*:\s*(.*?)\s*$")
_KEY_RE = re.compile(r"^--\s*(title|description)\s*:\s*(.*?)\s*$")
TYPES = ("VARCHAR", "INTEGER", "BIGINT", "DOUBLE", "FLOAT", "BOOLEAN")
_NO_DEFAULT = object()
_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}


@dataclass(frozen=True)
class Param:
    name: str
    type: str
    default: Any  # _NO_DEFAULT when required
    help: str

    @property
    def required(self) -> bool:
        return self.default is _NO_DEFAULT

    def describe(self) -> str:
        d = "" if self.required else f" = {'NULL' if self.default is None else self.default}"
        return f"{self.name} {self.type}{d}: {self.help}"


def convert(value: Any, type_: str, what: str, name: str | None = None) -> Any:
    """`value` (a Python value or the text of --param) as the declared type; None stays NULL."""
    if value is None:
        return None
    try:
        if type_ == "VARCHAR":
            return value if isinstance(value, str) else str(value)
        if type_ in ("INTEGER", "BIGINT"):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            v = int(value.strip()) if isinstance(value, str) else int(value)
            limit = 2**31 if type_ == "INTEGER" else 2**63
            if not -limit <= v < limit:
                raise ValueError
            return v
        if type_ in ("DOUBLE", "FLOAT"):
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if type_ == "BOOLEAN":
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in _TRUE or s in _FALSE:
                return s in _TRUE
            raise ValueError
    except (TypeError, ValueError):
        pass
    example = {"VARCHAR": "text", "INTEGER": "50", "BIGINT": "50", "DOUBLE": "0.5", "FLOAT": "0.5",
               "BOOLEAN": "true"}[type_]
    hint = f"params={{'{name}': {example}}}" if name else example
    raise BadParameter(f"{what} must be {type_}, got {value!r}. Pass e.g. {hint}.")


@dataclass(frozen=True)
class NamedQuery:
    name: str
    title: str
    description: str
    params: tuple[Param, ...]
    sql: str
    path: Path

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def bind(self, given: dict[str, Any]) -> dict[str, Any]:
        """Declared parameters with converted values and defaults filled in."""
        names = [p.name for p in self.params]
        for k in given:
            if k not in names:
                valid = ", ".join(names) or "none"
                raise BadParameter(
                    f"Query '{self.name}' has no parameter '{k}'.{did_you_mean(k, names)} Parameters: {valid}. "
                    f"See 'neurostore query --list'."
                )
        out = {}
        for p in self.params:
            if p.name in given:
                out[p.name] = convert(given[p.name], p.type, f"Parameter '{p.name}' of query '{self.name}'", p.name)
            elif p.required:
                raise MissingParameter(
                    f"Query '{self.name}' needs parameter '{p.name}' ({p.type}: {p.help}). "
                    f"Pass params={{'{p.name}': VALUE}}."
                )
            else:
                out[p.name] = p.default
        return out

    def to_dict(self) -> dict:
        return {"name": self.name, "title": self.title, "description": self.description,
                "params": [{"name": p.name, "type": p.type, "required": p.required,
                            "default": None if p.required else p.default, "help": p.help} for p in self.params]}


def parse_query(path: Path) -> NamedQuery:
    text = path.read_text()
    meta: dict[str, str] = {}
    params: list[Param] = []
    body: list[str] = []
    in_header = True
    for line in text.splitlines():
        s = line.strip()
        if in_header and s.startswith("--"):
            m = _PARAM_RE.match(s)
            if m:
                name, type_, default, help_ = m.groups()
                type_ = type_.upper()
                if type_ not in TYPES:
                    raise QueryError(f"{path}: parameter '{name}' has type {type_}; use one of {', '.join(TYPES)}.")
                if default is None:
                    dv = _NO_DEFAULT
                elif default.upper() == "NULL":
                    dv = None
                else:
                    dv = convert(default.strip().strip("'\""), type_, f"Default of '{name}' in {path.name}")
                params.append(Param(name, type_, dv, help_))
                continue
            k = _KEY_RE.match(s)
            if k:
                meta[k.group(1)] = k.group(2)
            continue
        if s or not in_header:
            in_header = False
            body.append(line)
    sql = "\n".join(body).strip().rstrip(";")
    try:
        stmts = duckdb.extract_statements(sql)
    except duckdb.Error as e:
        raise QueryError(f"{path}: SQL does not parse: {' '.join(str(e).split())}") from None
    if len(stmts) != 1:
        raise QueryError(f"{path}: a named query must be exactly one statement, found {len(stmts)}.")
    used = set(stmts[0].named_parameters)
    declared = {p.name for p in params}
    if used != declared:
        raise QueryError(
            f"{path}: parameters used in the SQL ({', '.join(sorted(used)) or 'none'}) differ from those declared "
            f"in the header ({', '.join(sorted(declared)) or 'none'}). Declare each with '-- param NAME TYPE: help'."
        )
    if "description" not in meta:
        raise QueryError(f"{path}: add a '-- description: ...' header line.")
    return NamedQuery(path.stem, meta.get("title", path.stem), meta["description"], tuple(params), sql, path)


def query_dirs() -> list[Path]:
    """The built-in queries/, then the folders of $NEUROSTORE_QUERIES (later folders override names)."""
    env = [Path(p) for p in os.environ.get("NEUROSTORE_QUERIES", "").split(os.pathsep) if p]
    return [QUERIES_DIR, *env]


@functools.lru_cache(maxsize=4)
def _list_cached(dirs: tuple[str, ...], stamp: tuple) -> dict[str, NamedQuery]:
    out = {}
    for d in dirs:
        for p in sorted(Path(d).glob("*.sql")):
            if not p.name.startswith("_"):
                out[p.stem] = parse_query(p)
    return out


def list_queries() -> dict[str, NamedQuery]:
    """Every named query, by name."""
    dirs = tuple(str(d) for d in query_dirs())
    # Re-parse when a file changes (users edit their own queries while a session runs).
    stamp = tuple((str(p), p.stat().st_mtime_ns) for d in dirs for p in sorted(Path(d).glob("*.sql")))
    return dict(_list_cached(dirs, stamp))


def get_query(name: str) -> NamedQuery:
    qs = list_queries()
    if name not in qs:
        raise UnknownQuery(unknown("query", name, qs, "See 'neurostore query --list'."))
    return qs[name]


def parse_param_pairs(pairs: list[str] | None) -> dict[str, str]:
    """['k=v', ...] from the command line -> {'k': 'v'} (values stay text; the query converts)."""
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise BadParameter(f"Parameter '{pair}' is not key=value. Pass e.g. --param concept=striped.")
        k, v = pair.split("=", 1)
        if not k.strip():
            raise BadParameter(f"Parameter '{pair}' has no name. Pass e.g. --param concept=striped.")
        out[k.strip()] = v
    return out


def parse_sql_params(pairs: list[str] | None) -> dict[str, Any]:
    """--param for raw SQL: JSON values (5, 0.5, true, null, "text") become typed; anything else is text."""
    import json

    out = {}
    for k, v in parse_param_pairs(pairs).items():
        try:
            out[k] = json.loads(v)
        except ValueError:
            out[k] = v
    return out

"""The Store: a folder of Parquet files, a manifest that says which files are committed, and DuckDB
views over them. This module opens and creates stores and describes their tables; the rest of the
class lives in views.py (reading), commit.py (manifest, runs, commit), maintenance.py (gc, check,
repair) and export.py, mixed in here."""

from __future__ import annotations

import contextlib
import json
import os
import threading
from pathlib import Path

import duckdb
import pyarrow as pa

from .. import __version__
from ..errors import BadInput, StoreDamaged, StoreNotFound, StoreVersionError, UnknownTable, unknown
from ..schema import TableSchema, load_schemas, schema_version
from .commit import Commits, _empty_manifest
from .derived import DERIVED_TABLES
from .export import Export
from .files import FORMAT, FORMAT_VERSION, _atomic_write, _locked, _reason, _utcnow
from .maintenance import Maintenance
from .views import Views

def _check_version(path: Path, info: dict) -> None:
    """Refuse a store written by a newer neurostore."""
    mine = schema_version()
    theirs = int(info.get("schema_version", 0))
    if theirs > mine or int(info.get("format_version", 0)) > FORMAT_VERSION:
        raise StoreVersionError(
            f"Store '{path}' was written with schema version {theirs} (format {info.get('format_version')}); "
            f"this neurostore {__version__} understands schema version {mine} (format {FORMAT_VERSION}). "
            "Upgrade neurostore (pip install -U neurostore) to open it."
        )


def _created_meanwhile(path: Path) -> bool:
    """Whether a store being created right now got its store.json (its creator holds the lock
    from the manifest until store.json is written)."""
    with contextlib.suppress(OSError), _locked(path):
        pass
    return (path / "store.json").exists()


class Store(Views, Commits, Maintenance, Export):
    """A neurostore store folder. Open with `Store.open(path)`."""

    def __init__(self, path: Path, read_only: bool, info: dict):
        self.path = path
        self.read_only = read_only
        self.info = info
        self.schemas: dict[str, TableSchema] = load_schemas()
        self._con: duckdb.DuckDBPyConnection | None = None
        self._sig = None
        self._mutex = threading.RLock()
        self._columns_cache: dict[str, frozenset] = {}
        self._info_damaged: str | None = None  # what is wrong with store.json, for check()
        self._reader = None  # a query function every sql() goes to instead of a connection (reading_through)

    # ---- opening ---------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike, read_only: bool = False, create: bool | None = None) -> "Store":
        """Open the store at `path`; create it when missing unless `read_only` (or create=False)."""
        path = Path(path).expanduser().resolve()
        create = (not read_only) if create is None else create
        info_path = path / "store.json"
        if not info_path.exists() and ((path / "manifest.json").exists() or (path / "tables").is_dir()) \
                and not _created_meanwhile(path):
            raise StoreDamaged(f"Store '{path}' has no store.json (its manifest or tables are there). "
                               f"Run 'neurostore check --repair --store {path}' to rewrite it.")
        if not info_path.exists():
            if path.exists() and not path.is_dir():
                raise BadInput(f"'{path}' is a file, not a store folder. Pass store=PATH, a folder.")
            if not create or read_only:
                raise StoreNotFound(
                    f"No neurostore store at '{path}'. Create one with 'neurostore demo --store {path}' "
                    "(or any command that writes), or pass store=PATH / set $NEUROSTORE_STORE."
                )
            if path.exists() and any(p.name != ".lock" for p in path.iterdir()):
                raise BadInput(
                    f"'{path}' exists and is not a neurostore store (no store.json). Pass an empty or new folder."
                )
            cls._create(path)
        try:
            info = json.loads(info_path.read_bytes())
        except ValueError as e:  # garbage or truncated: JSONDecodeError, UnicodeDecodeError
            raise StoreDamaged(f"Store '{path}': store.json is unreadable ({_reason(e)}). "
                               f"Run 'neurostore check --repair --store {path}' to rewrite it.") from None
        if not isinstance(info, dict):
            raise StoreDamaged(f"Store '{path}': store.json holds a JSON {type(info).__name__}, not an object. "
                               f"Run 'neurostore check --repair --store {path}' to rewrite it.")
        if info.get("format") != FORMAT:
            raise BadInput(f"'{path}' is not a neurostore store (store.json has format {info.get('format')!r}).")
        _check_version(path, info)
        return cls(path, read_only, info)

    @classmethod
    def reading_through(cls, path: str | os.PathLike, reader) -> "Store":
        """A read-only Store whose every query is `reader(sql, params)` (-> Arrow table): API
        functions written against Store (e.g. analysis.find) then read what the caller decides,
        such as the web app's locked snapshot, without opening another connection to the files."""
        store = cls(Path(path), True, {})
        store._reader = reader
        return store

    @classmethod
    def _open_damaged(cls, path: Path, read_only: bool, problem: str) -> "Store":
        """A store whose store.json is missing or unreadable, opened only to check and repair it."""
        store = cls(path, read_only, {})
        store._info_damaged = problem
        return store

    @classmethod
    def _create(cls, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        with _locked(path):
            if (path / "store.json").exists():  # another process created it meanwhile
                return
            (path / "tables").mkdir(exist_ok=True)
            (path / "staging").mkdir(exist_ok=True)
            _atomic_write(path / "manifest.json", json.dumps(_empty_manifest(), indent=1))
            info = {"format": FORMAT, "format_version": FORMAT_VERSION, "schema_version": schema_version(),
                    "created_at": _utcnow().isoformat() + "Z", "created_by": f"neurostore {__version__}"}
            # store.json last: its presence marks a complete store.
            _atomic_write(path / "store.json", json.dumps(info, indent=1))

    def close(self) -> None:
        """Close the DuckDB connection (its memory and file handles). The store stays usable: the
        next query opens a fresh connection, so closing is never an error."""
        with self._mutex:
            if self._con is not None:
                self._con.close()
                self._con = None

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r}, read_only={self.read_only})"

    def tables(self) -> list[str]:
        """The store's table names (every table of the schema, empty ones included)."""
        return sorted(self.schemas)

    def table_counts(self) -> dict[str, int]:
        """Committed rows per table (from the manifest; no file is read)."""
        man = self.manifest()
        return {t: sum(e.get("rows", 0) for e in man.get("tables", {}).get(t, [])) for t in self.tables()}

    def table_summary(self) -> list[dict]:
        """Per table: name, rows, files, description."""
        man = self.manifest()
        out = []
        for t in self.tables():
            entries = man.get("tables", {}).get(t, [])
            out.append({"table": t, "rows": sum(e.get("rows", 0) for e in entries), "files": len(entries),
                        "description": self.schemas[t].description})
        return out

    def _table(self, table: str) -> TableSchema:
        return table_schema(table, self.schemas)

    def schema(self, table: str) -> list[tuple[str, str, str]]:
        """(column, type, comment) for each column of `table`."""
        return [(c.name, c.type, c.comment) for c in self._table(table).columns]

    def describe(self, table: str) -> dict:
        """Everything about a table: description, partition and sort columns, rows, columns."""
        return {**describe_schema(table, self.schemas), "rows": self.table_counts()[table]}

    def runs(self) -> pa.Table:
        """Every recorded run, newest first."""
        return self.sql("SELECT * FROM runs ORDER BY started_at DESC")


def table_schema(table: str, schemas: dict[str, TableSchema] | None = None) -> TableSchema:
    """A table's schema (schema/<table>.sql), or a one-line error naming the tables."""
    schemas = schemas if schemas is not None else load_schemas()
    if table not in schemas:
        raise UnknownTable(unknown("table", table, schemas, "See 'neurostore tables'."))
    return schemas[table]


def describe_schema(table: str, schemas: dict[str, TableSchema] | None = None) -> dict:
    """A table as schema/<table>.sql describes it, with no store (rows None): `Store.describe`."""
    ts = table_schema(table, schemas)
    return {"table": ts.name, "description": ts.description, "partition": list(ts.partition),
            "sort": list(ts.sort), "rows": None, "derived": table in DERIVED_TABLES,
            "columns": [{"column": c.name, "type": c.type, "comment": c.comment} for c in ts.columns]}


def check(path: str | os.PathLike, repair: bool = False) -> dict:
    """`Store.check` on the store at `path`, which may have an unreadable store.json or manifest
    (a damaged store cannot be opened for anything else)."""
    path = Path(path).expanduser().resolve()
    try:
        store = Store.open(path, read_only=not repair, create=False)
    except StoreDamaged as e:  # store.json unreadable, or missing beside a manifest or tables/
        store = Store._open_damaged(path, not repair, str(e).split(" Run 'neurostore check")[0])
    with store:
        return store.check(repair)

"""The store: a folder of Parquet files, a manifest that says which files are committed, and
DuckDB views over them. See docs/store.md for the layout and the commit protocol.

    store = Store.open("neurostore-store")
    with store.run("dissect", params={"model": "resnet50"}) as run:
        run.write("scores", arrow_or_pandas)     # validated against schema/, run_id filled in
    store.sql("SELECT * FROM scores WHERE unit = $u", {"u": 7})   # -> pyarrow.Table

Only this module writes files into a store.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import functools
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Iterable

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from . import __version__
from .errors import (
    BadInput,
    QueryError,
    SchemaMismatch,
    StoreDamaged,
    StoreNotFound,
    StoreVersionError,
    UnknownTable,
    unknown,
)
from .schema import TableSchema, conform, load_schemas, schema_version

FORMAT = "neurostore"
FORMAT_VERSION = 1

# Physical layout. Tables looked up by a few keys (one neuron, one concept) get smaller row groups
# than DuckDB's default so a point lookup decodes few rows; the writer sorts by the table's
# `-- sort:` columns so the row groups' min/max statistics prune everything else. Not too small:
# DuckDB pays per row group on every scan (bench/query_latency.py: at 20M scores, 2k-row groups
# made concept lookups 10x slower than 64k-row groups; 8k and 32k were equal for neuron lookups).
POINT_LOOKUP_ROW_GROUP = 32768
ROW_GROUP_ROWS = {t: POINT_LOOKUP_ROW_GROUP for t in
                  ("scores", "concept_units", "activations", "explanations", "units", "effects", "embeddings", "masks",
                   "patches")}
ROW_GROUP_ROWS["concept_units"] = 65536  # measured best for concept -> units at 8M rows
DEFAULT_ROW_GROUP = 122_880

# Tables the store derives from scores at commit, per model, so questions that would scan every
# score read a small table instead (never written directly; see _derived_select):
#   concept_units   for every (model, concept, scorer) the best CONCEPT_UNITS_TOP units across the
#                   model's layers: "concept -> units" reads one row group per model;
#   layer_concepts  for every (model, layer, scorer, concept) the rank-0 rows whose concept it is:
#                   "concepts per layer" reads ~1 row per distinct best concept, not every score.
DERIVED_TABLES = ("concept_units", "layer_concepts")
CONCEPT_UNITS_TOP = 100

# Files dropped from the manifest (replaced by a re-run) are deleted only after this many seconds,
# so a reader whose query started on the previous manifest never finds a file missing.
GRACE_SECONDS = 300.0
# A staging folder without a held lock this old belongs to a dead writer.
STALE_STAGING_SECONDS = 60.0

# Every committed file carries, in its Parquet key-value metadata under this key, what its manifest
# entry needs besides size and hash (table, partition, run_id, work_key, replace; a runs file also
# the manifest generation it committed), so a lost manifest can be rebuilt from the files alone.
KV_KEY = "neurostore"
# Committed files are named after their run: <run_id>-<n>.parquet, <run_id>-<table>.parquet, runs/<run_id>.parquet.
RUN_FILE = re.compile(r"^(\d{8}T\d{6}Z-[0-9a-f]{8})(?:-[^/]*)?\.parquet$")
# Where `check --repair` moves files it takes out of tables/ (damaged or unknown): set aside, never deleted.
SET_ASIDE = "damaged"

PARTITION_RULES = {
    "model": (re.compile(r"^[a-z0-9][a-z0-9_.\-]*$"), "lowercase letters, digits and _ . - (e.g. 'resnet50')"),
    "layer": (re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.]*$"), "a module path of letters, digits, _ and . (e.g. 'layer3.1.conv2')"),
}


def hive_types(partition) -> str:
    """DuckDB hive_types for a table's partition columns: always text (a layer named '0' stays '0')."""
    return "{" + ", ".join(f"'{c}': VARCHAR" for c in partition) + "}"


VERSION_PACKAGES = ("neurostore", "duckdb", "pyarrow", "numpy", "pandas", "torch", "torchvision", "open_clip_torch",
                    "timm", "sentence-transformers")


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


def work_key(command: str, params: dict | None) -> str:
    """Identity of a piece of work: a re-run with the same key replaces the earlier rows."""
    blob = json.dumps({"command": command, "params": params or {}}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def package_versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for name in VERSION_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    out["neurostore"] = __version__
    return out


@functools.lru_cache(maxsize=1)
def git_revision() -> str | None:
    """The git revision of neurostore when it runs from a checkout, else None."""
    repo = Path(__file__).resolve().parent.parent
    if not (repo / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _fsync(path: Path) -> None:
    """fsync a file or a folder (a folder's entry list: makes a rename durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, text: str) -> None:
    """Write, fsync, then os.replace: readers see the old file or the new one, never a mix."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(3)}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _kv_sql(meta: dict) -> str:
    """DuckDB COPY option recording a file's manifest facts in its Parquet key-value metadata."""
    return f"KV_METADATA {{{KV_KEY}: {_sql_str(json.dumps(meta, sort_keys=True))}}}"


def _file_facts(path: Path) -> dict | None:
    """The manifest facts a committed file recorded in its footer (None for files written before
    they were recorded, or a footer that cannot be read)."""
    try:
        kv = pq.ParquetFile(path).metadata.metadata or {}
        return json.loads(kv[KV_KEY.encode()]) if KV_KEY.encode() in kv else None
    except Exception:  # any unreadable footer: the caller treats the file as unproven
        return None


def _file_run_id(path: Path) -> str | None:
    """The run that wrote a file under tables/: from its footer, else from its name."""
    facts = _file_facts(path)
    if facts and facts.get("run_id"):
        return facts["run_id"]
    m = RUN_FILE.match(path.name)
    return m.group(1) if m else None


def _table_of(rel: str) -> str | None:
    """The table folder of a path under tables/ ('tables/scores/model=m/x.parquet' -> 'scores')."""
    parts = rel.split("/")
    return parts[1] if len(parts) > 2 and parts[0] == "tables" else None


def _sql_str(s: str) -> str:
    return "'" + str(s).replace("'", "''") + "'"


def _part_dir(partition: dict[str, str]) -> str:
    return "/".join(f"{k}={v}" for k, v in partition.items())


def check_partition_value(table: str, column: str, value: Any) -> str:
    pattern, valid = PARTITION_RULES[column]
    if value is None or not isinstance(value, str) or not pattern.match(value):
        raise SchemaMismatch(
            f"Table '{table}', column '{column}': {value!r} is not a valid {column} (partition directory). "
            f"Use {valid}."
        )
    return value


def _manifest_problem(man) -> str | None:
    """What makes a parsed manifest unusable (wrong JSON type, missing keys), or None."""
    if not isinstance(man, dict):
        return f"a JSON {type(man).__name__}, not an object"
    if man.get("format") != "neurostore-manifest" or not isinstance(man.get("tables"), dict) \
            or not isinstance(man.get("retired", []), list):
        return "not a neurostore manifest: no format, tables or retired list"
    for table, entries in man["tables"].items():
        if not isinstance(entries, list) or not all(
                isinstance(e, dict) and isinstance(e.get("path"), str) and isinstance(e.get("partition"), dict)
                for e in entries):
            return f"table '{table}' has malformed entries"
    if not all(isinstance(r, dict) and isinstance(r.get("path"), str) for r in man.get("retired", [])):
        return "malformed retired list"
    return None


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


def _reason(e: Exception) -> str:
    """A decode error in a few words, on one line."""
    return " ".join(f"{type(e).__name__}: {e}".split())[:120]


def _empty_manifest() -> dict:
    return {"format": "neurostore-manifest", "generation": 0, "updated_at": None, "tables": {}, "retired": []}


def _derived_select(table: str, src: str, run_id_sql: str) -> str:
    """The SELECT deriving `table` (one of DERIVED_TABLES) from one model's score files `src` (a
    DuckDB list of paths), in the table's file-column order. `run_id_sql` is the run_id of
    layer_concepts rows (concept_units keeps each score's own run_id). Used at commit and, for
    stores written before a derived table existed, inside its view."""
    scores = f"read_parquet({src}, hive_partitioning=true, hive_types={hive_types(('model', 'layer'))})"
    if table == "concept_units":
        return f"""
            SELECT concept, scorer, unit_rank AS rank, layer, unit, score, confidence, vocabulary, encoder, run_id
            FROM (
                SELECT concept, scorer,
                       CAST(row_number() OVER w - 1 AS INTEGER) AS unit_rank,
                       layer, unit, score, confidence, vocabulary, encoder, run_id
                FROM {scores}
                WHERE concept IS NOT NULL AND score IS NOT NULL
                WINDOW w AS (PARTITION BY concept, scorer ORDER BY score DESC, layer, unit)
                -- the window by name: 'rank' is also a column of scores (a concept's rank in its unit)
                QUALIFY row_number() OVER w <= {CONCEPT_UNITS_TOP}
            ) ORDER BY concept, scorer, unit_rank"""
    if table == "layer_concepts":
        # Every rank-0 row counts, as a GROUP BY over scores would (a NULL concept is a group too).
        # Written in layer_concept_counts' output order: DuckDB sorts presorted rows about twice as
        # fast (bench: 500k rows, 160 vs 330 ms).
        return f"""
            SELECT layer, scorer, concept, count(*) AS n_units, CAST(avg(confidence) AS FLOAT) AS mean_confidence,
                   {run_id_sql} AS run_id
            FROM {scores}
            WHERE rank = 0
            GROUP BY layer, scorer, concept
            ORDER BY layer, scorer, n_units DESC, concept"""
    raise ValueError(f"no derivation for table {table!r}")  # a developer's bug: DERIVED_TABLES lists it


class Store:
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
            if not create or read_only:
                raise StoreNotFound(
                    f"No neurostore store at '{path}'. Create one with 'neurostore demo --store {path}' "
                    "(or any command that writes), or pass --store PATH / set $NEUROSTORE_STORE."
                )
            if path.exists() and not path.is_dir():
                raise BadInput(f"'{path}' is a file, not a store folder. Pass --store with a folder path.")
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

    # ---- manifest --------------------------------------------------------------------------

    def manifest(self) -> dict:
        """The committed snapshot: which files make up each table. A missing or unreadable
        manifest raises StoreDamaged: without it no file can be told committed or garbage."""
        repair = f"Run 'neurostore check --repair --store {self.path}' to rebuild it from the Parquet files."
        try:
            man = json.loads((self.path / "manifest.json").read_bytes())
        except FileNotFoundError:
            raise StoreDamaged(f"Store '{self.path}' has no manifest.json, so which files are committed is unknown "
                               f"(nothing was read or changed). {repair}") from None
        except ValueError as e:  # garbage or truncated: JSONDecodeError, UnicodeDecodeError
            raise StoreDamaged(f"Store '{self.path}': manifest.json is unreadable ({_reason(e)}). {repair}") from None
        problem = _manifest_problem(man)
        if problem:
            raise StoreDamaged(f"Store '{self.path}': manifest.json is damaged ({problem}). {repair}")
        return man

    def _manifest_sig(self):
        try:
            st = os.stat(self.path / "manifest.json")
        except FileNotFoundError:
            self.manifest()  # raises the one-line StoreDamaged
            raise
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def damaged_files(self, entries: Iterable[dict]) -> list[str]:
        """Manifest entries whose file is missing or has another size than committed (one stat
        each; content hashes are compared only by `check`), as 'PATH is missing' lines."""
        out = []
        for e in entries:
            try:
                size = os.stat(self.path / e["path"]).st_size
            except OSError:
                out.append(f"{e['path']} is missing")
                continue
            if e.get("bytes") is not None and size != e["bytes"]:
                out.append(f"{e['path']} has {size} bytes, {e['bytes']} committed")
        return out

    # ---- reading ---------------------------------------------------------------------------

    def view_sql(self, table: str, manifest: dict, root: str | None = None) -> str:
        """SELECT that reads a table's committed files (or none), in DDL column order."""
        ts = self.schemas[table]
        root = str(self.path) if root is None else root
        files = [e["path"] for e in manifest.get("tables", {}).get(table, [])]
        cols = []
        for c in ts.columns:
            # JSON is stored as text; give readers the JSON type back.
            cols.append(f"CAST({c.name} AS JSON) AS {c.name}" if c.type == "JSON" else c.name)
        # A derived table of a store written before the table existed lacks the models committed
        # then: derive their rows in the view from their scores (slower, never wrong) until the
        # next commit of the model's scores writes the table.
        legacy = self._underived_models(table, manifest) if table in DERIVED_TABLES else {}
        if root == str(self.path):  # reading in place: a view over a damaged file raises a clear error instead
            entries = manifest.get("tables", {}).get(table, []) + [
                e for e in manifest.get("tables", {}).get("scores", []) if e["partition"].get("model") in legacy]
            bad = self.damaged_files(entries)
            if bad:
                more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
                msg = (f"Table '{table}' cannot be read: {bad[0]}{more}. "
                       f"Run 'neurostore check --store {self.path}' (--repair drops the damaged files).")
                return ("SELECT " + ", ".join(f"CAST(NULL AS {c.type}) AS {c.name}" for c in ts.columns)
                        + f" WHERE error({_sql_str(msg)})")
        computed = [self._derived_view(table, model, score_files, root) for model, score_files in legacy.items()]
        if not files:
            if computed:
                return " UNION ALL ".join(computed)
            return "SELECT " + ", ".join(f"CAST(NULL AS {c.type}) AS {c.name}" for c in ts.columns) + " LIMIT 0"
        paths = "[" + ", ".join(_sql_str(os.path.join(root, f) if root else f) for f in files) + "]"
        hive = f", hive_partitioning=true, hive_types={hive_types(ts.partition)}" if ts.partition else ", hive_partitioning=false"
        # Files written before a column was added to schema/ lack it: read them by name and
        # give the column NULL where no file has it, so an older store stays readable.
        per_file = [self._file_columns(e) for e in manifest["tables"][table]]
        have = set().union(*per_file) | set(ts.partition)
        if any(f != per_file[0] for f in per_file) or any(c.name not in have for c in ts.columns):
            hive += ", union_by_name=true"
            cols = [col if c.name in have else f"CAST(NULL AS {c.type}) AS {c.name}"
                    for c, col in zip(ts.columns, cols)]
        return " UNION ALL ".join([f"SELECT {', '.join(cols)} FROM read_parquet({paths}{hive})"] + computed)

    @staticmethod
    def _underived_models(table: str, manifest: dict) -> dict[str, list[str]]:
        """Models with committed scores but no `table` files (written before the table existed),
        with their score files."""
        tables = manifest.get("tables", {})
        have = {e["partition"]["model"] for e in tables.get(table, [])}
        out: dict[str, list[str]] = {}
        for e in tables.get("scores", []):
            if e["partition"]["model"] not in have:
                out.setdefault(e["partition"]["model"], []).append(e["path"])
        return out

    def _derived_view(self, table: str, model: str, score_files: list[str], root: str) -> str:
        """A derived table's rows for one model, computed from its score files at query time."""
        src = "[" + ", ".join(_sql_str(os.path.join(root, f) if root else f) for f in score_files) + "]"
        cols = ", ".join(f"{_sql_str(model)} AS model" if c.name == "model" else c.name
                         for c in self.schemas[table].columns)
        return f"SELECT {cols} FROM ({_derived_select(table, src, 'CAST(NULL AS VARCHAR)')})"

    def _file_columns(self, entry: dict) -> frozenset:
        """The columns a committed file holds (from the manifest, or its footer for manifests
        written before columns were recorded); files are immutable, so this is cached."""
        if "columns" in entry:
            return frozenset(entry["columns"])
        path = entry["path"]
        if path not in self._columns_cache:
            self._columns_cache[path] = frozenset(pq.read_schema(self.path / path).names)
        return self._columns_cache[path]

    def _create_views(self, con, manifest: dict) -> None:
        for name in self.schemas:
            con.execute(f'CREATE OR REPLACE VIEW "{name}" AS {self.view_sql(name, manifest)}')

    def connect(self) -> duckdb.DuckDBPyConnection:
        """A new in-memory DuckDB connection with the committed tables as views, the macros and the
        semantic UDFs. The caller owns (and closes) it; views reflect the manifest at this moment."""
        from .sqlfuncs import prepare_connection

        con = duckdb.connect(":memory:")
        # Parquet footers are re-read on every query otherwise; the files are immutable, so caching is safe.
        con.execute("SET parquet_metadata_cache = true")
        self._create_views(con, self.manifest())
        prepare_connection(con)
        return con

    def _connection(self) -> duckdb.DuckDBPyConnection:
        """The store's own connection, with views rebuilt whenever the manifest was replaced."""
        sig = self._manifest_sig()
        if self._con is None:
            self._con = self.connect()
            self._sig = sig
        elif sig != self._sig:
            self._create_views(self._con, self.manifest())
            self._sig = sig
        return self._con

    def sql(self, query: str, params: dict | list | None = None) -> pa.Table:
        """Run DuckDB SQL over the store's views; values in `params` are bound ($name or ?)."""
        with self._mutex:
            con = self._connection()
            try:
                rel = con.sql(query, params=params) if params else con.sql(query)
                return rel.to_arrow_table() if rel is not None else pa.table({})
            except duckdb.Error as e:
                raise self._query_error(e) from None

    def df(self, query: str, params: dict | list | None = None):
        """`sql()` as a pandas DataFrame."""
        return self.sql(query, params).to_pandas()

    def _query_error(self, e: Exception) -> Exception:
        msg = " ".join(str(e).split())
        m = re.search(r"Table '\w+' cannot be read: .*", msg)
        if m:
            return StoreDamaged(m.group(0))
        if isinstance(e, (duckdb.IOException, duckdb.InvalidInputException)) and str(self.path) in msg:
            # A file damaged after this connection's views were built.
            return StoreDamaged(f"A file of the store cannot be read: {msg} "
                                f"Run 'neurostore check --store {self.path}'.")
        m = re.search(r"Table with name (\w+) does not exist", msg)
        if m:
            return UnknownTable(unknown("table", m.group(1), self.schemas, "See 'neurostore tables'."))
        if "Parameter" in msg and ("missing" in msg.lower() or "not found" in msg.lower()):
            return QueryError(f"{msg} Pass every $name the SQL uses with --param name=value.")
        return QueryError(f"{msg} See 'neurostore tables' and 'neurostore schema TABLE'.")

    def query(self, name: str, params: dict | None = None) -> pa.Table:
        """Run the named query `queries/<name>.sql` with typed, bound parameters."""
        from .queries import get_query

        q = get_query(name)
        return self.sql(q.sql, q.bind(params or {}))

    def queries(self) -> list:
        """The named queries (name, title, description, params)."""
        from .queries import list_queries

        return list(list_queries().values())

    def tables(self) -> list[str]:
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
        if table not in self.schemas:
            raise UnknownTable(unknown("table", table, self.schemas, "See 'neurostore tables'."))
        return self.schemas[table]

    def schema(self, table: str) -> list[tuple[str, str, str]]:
        """(column, type, comment) for each column of `table`."""
        return [(c.name, c.type, c.comment) for c in self._table(table).columns]

    def describe(self, table: str) -> dict:
        """Everything about a table: description, partition and sort columns, rows, columns."""
        ts = self._table(table)
        return {"table": ts.name, "description": ts.description, "partition": list(ts.partition),
                "sort": list(ts.sort), "rows": self.table_counts()[table],
                "derived": table in DERIVED_TABLES,
                "columns": [{"column": c.name, "type": c.type, "comment": c.comment} for c in ts.columns]}

    def runs(self) -> pa.Table:
        """Every recorded run, newest first."""
        return self.sql("SELECT * FROM runs ORDER BY started_at DESC")

    # ---- writing ---------------------------------------------------------------------------

    def _check_writable(self) -> None:
        if self.read_only:
            raise BadInput(f"Store '{self.path}' was opened read-only; open it with read_only=False to write.")

    def run(self, command: str, params: dict | None = None, work_key: str | None = None,
            replace: str = "work") -> "Run":
        """A run: every write belongs to one. Use as a context manager: commits on normal exit,
        records a failed run (and keeps none of its rows) on an exception.

        replace='work' (default): committing drops earlier files of the same (table, partition,
        work_key). replace='partition': drops every earlier file of the partitions written."""
        self._check_writable()
        # A damaged store is refused before any work: without a manifest nothing can be committed,
        # and a commit would re-derive tables from damaged score files.
        bad = self.damaged_files(e for entries in self.manifest()["tables"].values() for e in entries)
        if bad:
            raise StoreDamaged(f"Store '{self.path}' has damaged files ({bad[0]}"
                               f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}); nothing was written. "
                               f"Run 'neurostore check --repair --store {self.path}' first.")
        if replace not in ("work", "partition"):
            raise BadInput(f"Unknown replace mode '{replace}'. Valid: work, partition.")
        return Run(self, command, params or {}, work_key, replace)

    def write(self, table: str, data, run: "Run | None" = None, command: str | None = None,
              params: dict | None = None) -> dict:
        """Write `data` to `table` inside `run`, or in a run of its own that commits at once.

        A one-shot write without params is keyed by its content, so writing the same rows twice
        keeps one copy."""
        if run is not None:
            return {"table": table, "rows": run.write(table, data), "run_id": run.run_id}
        arrow = conform(self._table(table), data, fill={"run_id": ""})
        if params is None:
            sink = pa.BufferOutputStream()
            pq.write_table(arrow, sink)
            params = {"table": table, "content": hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()[:16]}
        with self.run(command or f"write {table}", params) as r:
            n = r.write(table, arrow)
        return {"table": table, "rows": n, "run_id": r.run_id}

    @contextlib.contextmanager
    def _lock(self):
        with _locked(self.path):
            yield

    def _commit(self, run: "Run", sealed: list[dict], status: str, error: str | None) -> dict:
        """Under the store lock: move sealed files into tables/, derive, record the run, swap the
        manifest. The manifest replace is the single moment the run becomes visible."""
        with self._lock():
            man = self.manifest()
            tables = man.setdefault("tables", {})
            now = time.time()
            retired = man.setdefault("retired", [])
            n_retired = len(retired)
            touched_models = set()
            for s in sealed:
                dest = self.path / s["path"]
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.rename(s["src"], dest)
                entries = tables.setdefault(s["table"], [])
                keep = []
                for e in entries:
                    same_part = e["partition"] == s["partition"]
                    drop = same_part and (run.replace == "partition" or e["work_key"] == s["work_key"]) \
                        and e["run_id"] != run.run_id
                    (retired.append({"path": e["path"], "at": now}) if drop else keep.append(e))
                keep.append({k: s[k] for k in ("path", "run_id", "work_key", "partition", "rows", "bytes", "columns",
                                               "sha256")})
                tables[s["table"]] = keep
                if s["table"] == "scores":
                    touched_models.add(s["partition"]["model"])
            for model in sorted(touched_models):
                self._derive(man, model, run)
            # The run's provenance row, committed together with its data.
            row = run.runs_row(status, error)
            files = [e["path"] for entries in tables.values() for e in entries if e["run_id"] == run.run_id]
            self._record_run(man, run, row, files, [r["path"] for r in retired[n_retired:]])
            self._collect_garbage(man, now)
            man["generation"] = int(man.get("generation", 0)) + 1
            man["updated_at"] = _utcnow().isoformat() + "Z"
            _atomic_write(self.path / "manifest.json", json.dumps(man, separators=(",", ":")))
            self._write_load_sql(man)
        return row

    def _record_run(self, man: dict, run: "Run", row: dict, files: list[str], retired: list[str]) -> None:
        """Write a run's `runs` row (written in staging and renamed: tables/ never holds half a
        file) and list it in `man`. Its footer records the generation it commits and the files it
        committed and retired, so a lost manifest is rebuilt by replaying the commits in order."""
        path = f"tables/runs/{run.run_id}.parquet"
        facts = {"table": "runs", "partition": {}, "run_id": run.run_id, "work_key": run.work_key,
                 "replace": "work", "generation": int(man.get("generation", 0)) + 1, "files": files,
                 "retired": retired}
        arrow = conform(self.schemas["runs"], pa.Table.from_pylist([row]))
        tmp = run.staging / "runs.parquet"
        pq.write_table(arrow.replace_schema_metadata({KV_KEY: json.dumps(facts, sort_keys=True)}), tmp)
        _fsync(tmp)
        (self.path / "tables/runs").mkdir(parents=True, exist_ok=True)
        os.rename(tmp, self.path / path)
        man["tables"].setdefault("runs", []).append({
            "path": path, "run_id": run.run_id, "work_key": run.work_key, "partition": {}, "rows": 1,
            "status": row["status"], "bytes": (self.path / path).stat().st_size, "sha256": _sha256(self.path / path)})

    def _derive(self, man: dict, model: str, run: "Run") -> None:
        """Recompute every derived table of one model from its committed scores (new manifest),
        on one work connection."""
        tables = man["tables"]
        files = [str(self.path / e["path"]) for e in tables.get("scores", []) if e["partition"]["model"] == model]
        now = time.time()
        src = "[" + ", ".join(_sql_str(f) for f in files) + "]"
        con = _work_connection(self.path / "staging" / run.run_id) if files else None
        try:
            for table in DERIVED_TABLES:
                old = [e for e in tables.get(table, []) if e["partition"]["model"] == model]
                man["retired"].extend({"path": e["path"], "at": now} for e in old)
                tables[table] = [e for e in tables.get(table, []) if e["partition"]["model"] != model]
                if not files:
                    continue
                rel = f"tables/{table}/model={model}/{run.run_id}-{table}.parquet"
                dest = self.path / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                rg = ROW_GROUP_ROWS.get(table, DEFAULT_ROW_GROUP)
                # replace 'partition': a model's derived file replaces all earlier ones of the model
                facts = {"table": table, "partition": {"model": model}, "run_id": run.run_id,
                         "work_key": f"derived:{table}", "replace": "partition"}
                con.execute(f"COPY ({_derived_select(table, src, _sql_str(run.run_id))}) TO {_sql_str(dest)} "
                            f"(FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE {rg}, {_kv_sql(facts)})")
                _fsync(dest)
                tables[table].append({"path": rel, "run_id": run.run_id, "work_key": f"derived:{table}",
                                      "partition": {"model": model}, "rows": pq.ParquetFile(dest).metadata.num_rows,
                                      "bytes": dest.stat().st_size, "sha256": _sha256(dest),
                                      "columns": [c.name for c in self.schemas[table].file_columns]})
        finally:
            if con is not None:
                con.close()

    def _collect_garbage(self, man: dict, now: float, unlisted: bool = True) -> None:
        """Under the lock, with a readable manifest: delete what is provably garbage, nothing else:
        retired files past the grace period, unlisted files of runs that never committed (see
        `_garbage_reason`), temp files of killed manifest writes and staging folders of dead runs."""
        still = []
        for r in man.get("retired", []):
            if now - r["at"] >= GRACE_SECONDS:
                with contextlib.suppress(FileNotFoundError):
                    (self.path / r["path"]).unlink()
            else:
                still.append(r)
        man["retired"] = still
        for f, _ in self._garbage(man, unlisted):
            with contextlib.suppress(FileNotFoundError):
                f.unlink() if f.is_file() else shutil.rmtree(f, ignore_errors=True)

    def _unlisted(self, man: dict) -> list[Path]:
        """Parquet files under tables/ that the manifest neither lists nor has retired."""
        known = {e["path"] for entries in man.get("tables", {}).values() for e in entries}
        known |= {r["path"] for r in man.get("retired", [])}
        tables_dir = self.path / "tables"
        return sorted(f for f in (tables_dir.rglob("*.parquet") if tables_dir.exists() else [])
                      if f.relative_to(self.path).as_posix() not in known)

    def _garbage(self, man: dict, unlisted: bool = True) -> list[tuple[Path, str]]:
        """(path, why) for every provably garbage file or folder besides retired files: only a
        readable manifest can prove an unlisted file garbage (without one, nothing is garbage;
        unlisted=False for a manifest rebuilt from files, whose runs rows may be the damaged ones)."""
        out = [(f, "temp file of a killed write") for f in sorted(self.path.glob(".*.tmp"))]
        status = {e["run_id"]: e.get("status", "committed") for e in man["tables"].get("runs", [])}
        for f in self._unlisted(man) if unlisted else []:
            why = self._garbage_reason(man, status, f)
            if why:
                out.append((f, why))
        staging = self.path / "staging"
        out += [(d, "staging folder of a dead run") for d in sorted(staging.iterdir() if staging.exists() else [])
                if d.is_dir() and _staging_is_dead(d)]
        return out

    def _garbage_reason(self, man: dict, status: dict[str, str], f: Path) -> str | None:
        """Why an unlisted file is garbage, or None when that cannot be proven (keep it). Runs move
        files into tables/ only under the lock, just before their runs row and the manifest swap, so
        an unlisted file is garbage when its run (from its footer or its name) failed, never wrote
        its runs row, or wrote it for the commit right after this manifest and was killed before
        the swap. A file of a committed run, or of no known run, is never garbage. `status`: each
        run's status in the manifest."""
        run_id = _file_run_id(f)
        if run_id is None:
            return None
        if status.get(run_id) == "failed":
            return f"written by run {run_id}, which failed"
        if run_id in status:
            return None
        runs_file = self.path / "tables/runs" / f"{run_id}.parquet"
        if not runs_file.exists():
            return f"written by run {run_id}, which never committed (no runs row)"
        facts = _file_facts(runs_file) or {}
        if facts.get("generation") == int(man.get("generation", 0)) + 1:
            return f"written by run {run_id}, killed before its commit"
        return None

    def gc(self) -> dict:
        """Clean garbage now (writers also do it at every commit)."""
        self._check_writable()
        with self._lock():
            man = self.manifest()
            before = len(man.get("retired", []))
            self._collect_garbage(man, time.time())
            man["generation"] = int(man.get("generation", 0)) + 1
            _atomic_write(self.path / "manifest.json", json.dumps(man, separators=(",", ":")))
        return {"retired_deleted": before - len(man["retired"])}

    def _write_load_sql(self, man: dict) -> None:
        """<store>/load.sql: views over the committed files, for plain duckdb run from the store folder."""
        _atomic_write(self.path / "load.sql", self._load_sql(man, root=""))

    def _load_sql(self, man: dict, root: str) -> str:
        lines = ["-- Recreates the neurostore views over this snapshot's Parquet files.",
                 "-- Run from this folder: duckdb -c \".read load.sql\" (paths are relative to it).", ""]
        for name in self.tables():
            lines.append(f"-- {self.schemas[name].description}")
            lines.append(f'CREATE OR REPLACE VIEW "{name}" AS {self.view_sql(name, man, root=root)};')
        return "\n".join(lines) + "\n"

    # ---- check and repair ------------------------------------------------------------------

    def check(self, repair: bool = False) -> dict:
        """Verify the committed files against the manifest: each file's size and sha256 (entries
        committed before hashes were recorded: size, a readable footer and its row count), and
        name unlisted files and garbage. A missing or unreadable manifest is checked by rebuilding
        it from the files (their footers record their manifest entries and the runs rows which
        runs committed, in which order).

        repair=True (under the writer lock) writes a manifest of every file that verifies,
        keeping every intact run; damaged and unknown files are moved to <store>/damaged/<time>/,
        never deleted; provable garbage is deleted. Returns the report: `clean`, `problems`
        (path, table, problem, rows), `garbage`, and after a repair `dropped`, `rows_dropped`,
        `set_aside`."""
        if repair:
            self._check_writable()
        with self._lock() if repair else contextlib.nullcontext():
            return self._check(repair)

    def _check(self, repair: bool) -> dict:
        now = time.time()
        problems: list[dict] = []
        if self._info_damaged:
            problems.append({"path": "store.json", "table": None, "problem": self._info_damaged, "rows": None})
        try:
            man, manifest_state = self.manifest(), "ok"
        except StoreDamaged as e:
            man, manifest_state = None, str(e).split(". Run 'neurostore check")[0]
            problems.append({"path": "manifest.json", "table": None, "problem": manifest_state, "rows": None})
        # dropped: the committed files left out of the new manifest
        new, dropped, found, set_aside = self._verified_manifest(man) if man is not None else self._rebuilt_manifest(now)
        problems += found
        # The derived tables of a model whose scores lost a file are recomputed by its views from the
        # remaining scores (exact) until its next commit, so retire the stale derived files.
        models = {p["path"].split("/")[2][len("model="):] for p in dropped
                  if p["table"] == "scores" and p["path"].count("/") > 3}
        stale = [e for t in DERIVED_TABLES for e in new["tables"].get(t, []) if e["partition"].get("model") in models]
        new["retired"] += [{"path": e["path"], "at": now} for e in stale]
        for table in DERIVED_TABLES:
            new["tables"][table] = [e for e in new["tables"].get(table, []) if e not in stale]
        garbage = self._garbage(new, unlisted=man is not None)
        for rel in sorted({self._rel(f) for f in self._unlisted(new)} - {self._rel(f) for f, _ in garbage}
                          - set(set_aside)):  # in tables/, in no manifest, and not provably garbage
            problems.append({"path": rel, "table": _table_of(rel), "rows": None,
                             "problem": "unlisted: in no manifest, and no failed or killed run wrote it"})
            set_aside.append(rel)
        entries = [e for es in new["tables"].values() for e in es]
        report = {"store": str(self.path), "clean": not problems, "manifest": manifest_state,
                  "files": len(entries), "rows": sum(e.get("rows", 0) for e in entries), "problems": problems,
                  "garbage": [{"path": self._rel(f), "reason": why} for f, why in garbage],
                  "repaired": False}
        if not repair or (not problems and not garbage):
            return report
        if set_aside:
            aside = self.path / SET_ASIDE / _utcnow().strftime("%Y%m%dT%H%M%SZ")
            for rel in set_aside:
                (aside / rel).parent.mkdir(parents=True, exist_ok=True)
                os.rename(self.path / rel, aside / rel)
            report["set_aside"] = self._rel(aside)
        if problems:
            # The repair is a run of its own: `runs` shows it, and its footer records the files it
            # dropped, so a later rebuild does not bring back what a dropped file had replaced.
            run = Run(self, "check --repair", {"dropped": [p["path"] for p in dropped], "set_aside": set_aside},
                      None, "work")
            try:
                self._record_run(new, run, run.runs_row("committed", None), [],
                                 [p["path"] for p in dropped] + [e["path"] for e in stale])
                run.state = "committed"
            finally:
                run._cleanup()
        self._collect_garbage(new, now, unlisted=man is not None)
        new["generation"] = int(new.get("generation", 0)) + 1
        new["updated_at"] = _utcnow().isoformat() + "Z"
        _atomic_write(self.path / "manifest.json", json.dumps(new, separators=(",", ":")))
        self._write_load_sql(new)
        if self._info_damaged:
            self.info = {"format": FORMAT, "format_version": FORMAT_VERSION, "schema_version": schema_version(),
                         "created_at": None, "created_by": None, "repaired_at": _utcnow().isoformat() + "Z",
                         "repaired_by": f"neurostore {__version__}"}
            _atomic_write(self.path / "store.json", json.dumps(self.info, indent=1))
            self._info_damaged = None
        rows_dropped: dict[str, int] = {}
        for p in dropped:
            rows_dropped[p["table"]] = rows_dropped.get(p["table"], 0) + (p["rows"] or 0)
        report.update(repaired=True, dropped=dropped, rows_dropped=rows_dropped)
        return report

    def _rel(self, p: Path) -> str:
        return p.relative_to(self.path).as_posix()

    def _verify_entry(self, e: dict) -> str | None:
        """What is wrong with a committed file, or None when it is intact."""
        f = self.path / e["path"]
        try:
            size = f.stat().st_size
        except OSError:
            return "missing"
        if e.get("bytes") is not None and size != e["bytes"]:
            return f"{'truncated' if size < e['bytes'] else 'replaced'}: {size} bytes, {e['bytes']} committed"
        if e.get("sha256"):
            return None if _sha256(f) == e["sha256"] else "corrupt: its sha256 differs from the committed one"
        try:  # committed before hashes were recorded
            rows = pq.ParquetFile(f).metadata.num_rows
        except Exception as ex:  # any unreadable footer
            return f"corrupt: unreadable Parquet footer ({_reason(ex)})"
        return None if e.get("rows") in (None, rows) else f"corrupt: {rows} rows, {e['rows']} committed"

    def _verified_manifest(self, man: dict) -> tuple[dict, list[dict], list[dict], list[str]]:
        """The manifest without its damaged entries; the damaged entries (dropped, and problems);
        the files to set aside."""
        new = json.loads(json.dumps(man))
        problems, set_aside = [], []
        for table, entries in man["tables"].items():
            keep = []
            for e in entries:
                why = self._verify_entry(e)
                if why is None:
                    keep.append(e)
                    continue
                problems.append({"path": e["path"], "table": table, "problem": why, "rows": e.get("rows", 0)})
                if why != "missing":
                    set_aside.append(e["path"])
            new["tables"][table] = keep
        return new, problems, problems, set_aside

    def _rebuilt_manifest(self, now: float) -> tuple[dict, list[dict], list[dict], list[str]]:
        """A manifest rebuilt from the files under tables/ (manifest.json lost or unreadable): the
        runs rows say which runs committed; their files' commits are replayed in commit order (the
        generation each runs file recorded, then its end time), so files a later run replaced are
        retired again, exactly as the lost manifest had them. Files of runs without a committed
        runs row are left unlisted (and set aside: nothing proves them garbage); damaged ones are
        set aside too. Returns
        the manifest, the dropped files (committed, not retired, damaged or missing), all problems
        and the files to set aside."""
        problems, set_aside, found = [], [], []
        tables_dir = self.path / "tables"
        for f in sorted(tables_dir.rglob("*.parquet") if tables_dir.exists() else []):
            entry, why = self._entry_from_file(f)
            if why:
                rel = self._rel(f)
                problems.append({"path": rel, "table": _table_of(rel), "problem": why, "rows": None})
                set_aside.append(rel)
            else:
                found.append(entry)
        runs = {}
        for e in list(found):
            if e["table"] == "runs":
                try:
                    (row,) = pq.read_table(self.path / e["path"], columns=["status", "ended_at", "work_key"]).to_pylist()
                except Exception as ex:  # not one readable runs row
                    problems.append({"path": e["path"], "table": "runs", "rows": None,
                                     "problem": f"corrupt: not one runs row ({_reason(ex)})"})
                    set_aside.append(e["path"])
                    found.remove(e)
                    continue
                e["status"] = row["status"]
                e["work_key"] = e["work_key"] or row["work_key"]
                runs[e["run_id"]] = (e["facts"].get("generation") or 0, row["ended_at"] or dt.datetime.min,
                                     e["run_id"], row["status"], e["facts"])
        man = _empty_manifest()
        man["tables"]["runs"] = [e for e in found if e["table"] == "runs"]
        by_run: dict[str, list[dict]] = {}
        for e in found:
            if e["table"] != "runs":
                by_run.setdefault(e["run_id"], []).append(e)
        by_path = {e["path"]: e for e in found}
        missing: set[str] = set()  # committed by a run, not retired by a later one, not on disk (or damaged)
        tables = man["tables"]
        for *_, run_id, status, facts in sorted(runs.values(), key=lambda r: r[:3]):
            if status != "committed":
                continue
            if "files" in facts:  # the run's footer lists what it committed and retired: replay that
                for path in facts["retired"]:
                    missing.discard(path)
                    for table, entries in tables.items():
                        if any(e["path"] == path for e in entries):
                            tables[table] = [e for e in entries if e["path"] != path]
                            man["retired"].append({"path": path, "at": now})
                for path in facts["files"]:
                    if path in by_path:
                        tables.setdefault(by_path[path]["table"], []).append(by_path[path])
                    else:
                        missing.add(path)
                continue
            for e in by_run.get(run_id, []):  # written before runs recorded their files: the same replacement as _commit
                # a file written before footers recorded facts is keyed by its run's work_key
                e["work_key"] = e["work_key"] or next(r["work_key"] for r in tables["runs"] if r["run_id"] == run_id)
                keep = []
                for old in tables.get(e["table"], []):
                    drop = old["partition"] == e["partition"] and old["run_id"] != run_id \
                        and (e["replace"] == "partition" or old["work_key"] == e["work_key"])
                    (man["retired"].append({"path": old["path"], "at": now}) if drop else keep.append(old))
                tables[e["table"]] = keep + [e]
        problems += [{"path": p, "table": _table_of(p), "problem": "missing", "rows": None}
                     for p in sorted(missing - set(set_aside))]
        # Damaged files a committed run still held (runs files from before they listed their files:
        # any damaged file named after a committed run).
        old_style = {r for *_, r, status, facts in runs.values() if status == "committed" and "files" not in facts}
        dropped = [p for p in problems if p["path"] in missing or _file_run_id(self.path / p["path"]) in old_style]
        man["generation"] = max((g for g, *_ in runs.values()), default=0)
        for entries in tables.values():
            for e in entries:
                for k in ("table", "replace", "facts"):
                    e.pop(k, None)
        return man, dropped, problems, set_aside

    def _entry_from_file(self, f: Path) -> tuple[dict | None, str | None]:
        """A file's manifest entry, from its footer (plus its table, replace mode and footer facts,
        needed to replay its commit), or why it cannot be one. Every row group is decoded, so a
        file that is corrupt inside is found too."""
        rel = self._rel(f)
        parts = rel.split("/")
        table = _table_of(rel)
        if table not in self.schemas:
            return None, "unlisted: not in a table's folder"
        ts = self.schemas[table]
        try:
            pf = pq.ParquetFile(f)
            for i in range(pf.num_row_groups):
                pf.read_row_group(i)
        except Exception as ex:  # any unreadable file
            return None, f"corrupt: unreadable Parquet ({_reason(ex)})"
        facts = _file_facts(f) or {}
        partition = dict(p.split("=", 1) for p in parts[2:-1] if "=" in p)
        names = pf.schema_arrow.names
        if list(partition) != list(ts.partition) or len(parts) != 3 + len(ts.partition):
            return None, f"unlisted: not in table '{table}''s partition folders"
        if facts and (facts.get("table"), facts.get("partition")) != (table, partition):
            return None, f"misplaced: a file of table '{facts.get('table')}' {facts.get('partition')}"
        if not set(names) <= {c.name for c in ts.file_columns} or "run_id" not in names:
            return None, f"misplaced: its columns are not those of table '{table}'"
        m = RUN_FILE.match(f.name)
        run_id = facts.get("run_id") or (m.group(1) if m else None)
        if run_id is None:
            return None, "unlisted: no neurostore run wrote it"
        return {"path": rel, "run_id": run_id, "work_key": facts.get("work_key"), "partition": partition,
                "rows": pf.metadata.num_rows, "bytes": f.stat().st_size, "columns": names, "sha256": _sha256(f),
                "table": table, "replace": facts.get("replace", "partition" if table in DERIVED_TABLES else "work"),
                "facts": facts}, None

    # ---- export ----------------------------------------------------------------------------

    def export(self, to: str | os.PathLike, overwrite: bool = False) -> dict:
        """Copy every committed table as plain Parquet (same Hive layout) to `to`, with load.sql and
        the schema DDL. The copy is a consistent snapshot of one manifest."""
        to = Path(to).expanduser().resolve()
        if to == self.path or self.path in to.parents:
            raise BadInput(f"Cannot export into the store itself ('{to}'). Pick a folder outside it.")
        if to.exists() and any(to.iterdir()) and not overwrite:
            raise BadInput(f"Export folder '{to}' is not empty. Pick an empty folder or pass overwrite=True (--overwrite).")
        man = self.manifest()
        bad = self.damaged_files(e for entries in man["tables"].values() for e in entries)
        if bad:
            raise StoreDamaged(f"Cannot export '{self.path}': {'; '.join(bad[:3])}"
                               f"{f' (and {len(bad) - 3} more)' if len(bad) > 3 else ''}. Nothing was copied. "
                               f"Run 'neurostore check --store {self.path}' (--repair drops the damaged files).")
        created = not to.exists()
        shutil.rmtree(to / "tables", ignore_errors=True)
        try:
            return self._export(man, to)
        except BaseException:
            # no partial copy left behind: remove what this export wrote
            shutil.rmtree(to if created else to / "tables", ignore_errors=True)
            raise

    def _export(self, man: dict, to: Path) -> dict:
        out_man = {"tables": {}}
        counts = {}
        n_files = 0
        for name in self.tables():
            entries = man.get("tables", {}).get(name, [])
            out_man["tables"][name] = []
            for e in entries:
                src = self.path / e["path"]
                dest = to / e["path"]
                dest.parent.mkdir(parents=True, exist_ok=True)
                try:  # committed files are immutable, so a hard link is a faithful, instant copy
                    os.link(src, dest)
                except OSError:
                    shutil.copy2(src, dest)
                out_man["tables"][name].append(e)
                n_files += 1
            counts[name] = sum(e.get("rows", 0) for e in entries)
        (to / "schema").mkdir(parents=True, exist_ok=True)
        for ts in self.schemas.values():
            if ts.path is not None:
                shutil.copy2(ts.path, to / "schema" / ts.path.name)
        (to / "load.sql").write_text(self._load_sql(out_man, root=""))
        return {"to": str(to), "tables": counts, "files": n_files, "rows": sum(counts.values())}

    # ---- semantic helpers --------------------------------------------------------------------

    def embed_concepts(self, vocabulary: str | None = None, concepts: Iterable[str] | None = None) -> dict:
        """Embed concepts with MiniLM and store them in `embeddings` (kind='concept'), so SQL's
        similar_concepts(phrase, k) can find them. Takes the concepts of `vocabulary` from the
        concepts table (all vocabularies when None), or an explicit list."""
        from .sqlfuncs import MINILM_ID, embed_texts

        if concepts is None:
            where, p = ("WHERE vocabulary = $v", {"v": vocabulary}) if vocabulary else ("", None)
            got = self.sql(f"SELECT DISTINCT concept FROM concepts {where} ORDER BY concept", p)
            concepts = [c for c in got.column("concept").to_pylist() if c]
            if not concepts:
                from .errors import UnknownVocabulary

                have = self.sql("SELECT DISTINCT vocabulary FROM concepts").column("vocabulary").to_pylist()
                raise UnknownVocabulary(unknown("vocabulary", vocabulary or "(any)", [v for v in have if v],
                                                "Write its concepts to the concepts table first."))
        concepts = sorted(dict.fromkeys(concepts))
        vecs = embed_texts(concepts)
        table = pa.table({
            "encoder": [MINILM_ID] * len(concepts),
            "kind": ["concept"] * len(concepts),
            "item_id": concepts,
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vecs.ravel(), pa.float32()), vecs.shape[1]),
        })
        params = {"vocabulary": vocabulary, "encoder": MINILM_ID} if vocabulary or concepts is None \
            else {"concepts": hashlib.sha256("\n".join(concepts).encode()).hexdigest()[:16], "encoder": MINILM_ID}
        with self.run("embed concepts", params) as run:
            run.write("embeddings", table)
        return {"concepts": len(concepts), "encoder": MINILM_ID, "run_id": run.run_id}


@contextlib.contextmanager
def _locked(path: Path):
    """The store's exclusive writer lock (fcntl.flock on <store>/.lock)."""
    fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _staging_is_dead(d: Path) -> bool:
    """A staging folder is dead when nobody holds its lock (its writer exited or was killed)."""
    lock = d / ".lock"
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        # Either being created right now or left half-made by a crash: wait until it is old.
        try:
            return time.time() - d.stat().st_mtime > STALE_STAGING_SECONDS
        except FileNotFoundError:
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # closing releases the probe's lock again
    return True


def _work_connection(spill_dir: Path) -> duckdb.DuckDBPyConnection:
    """A private DuckDB connection for sorting and deriving: bounded memory, spills to staging."""
    con = duckdb.connect(":memory:")
    spill_dir.mkdir(parents=True, exist_ok=True)
    con.execute(f"SET temp_directory = {_sql_str(spill_dir / 'spill')}")
    con.execute("SET memory_limit = '2GB'")
    con.execute("SET preserve_insertion_order = true")
    return con


class Run:
    """One unit of work. Rows written through it are staged privately and become visible
    all at once when it commits; a crash or an exception leaves none of them visible."""

    def __init__(self, store: Store, command: str, params: dict, key: str | None, replace: str):
        self.store = store
        self.command = command
        self.params = json.loads(json.dumps(params, default=str))  # what is recorded is what is keyed
        self.work_key = key or work_key(command, self.params)
        self.replace = replace
        self.started_at = _utcnow()
        self.run_id = self.started_at.strftime("%Y%m%dT%H%M%S") + "Z-" + secrets.token_hex(4)
        self.staging = store.path / "staging" / self.run_id
        self.staging.mkdir(parents=True)
        # Held for the run's lifetime: the kernel drops it when this process dies, which is how
        # later writers know the staging folder is garbage.
        self._lock_fd = os.open(self.staging / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        (self.staging / "run.json").write_text(json.dumps(
            {"run_id": self.run_id, "command": command, "params": self.params, "pid": os.getpid()}))
        self._chunks: dict[tuple[str, str], list[Path]] = {}
        self._partitions: dict[tuple[str, str], dict] = {}
        self.rows: dict[str, int] = {}
        self.state = "open"
        self.summary: dict | None = None

    def __repr__(self) -> str:
        return f"Run({self.run_id!r}, {self.command!r}, state={self.state!r})"

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self.state != "open":
            return False
        if exc_type is None:
            self.commit()
        else:
            self.fail(exc if exc is not None else exc_type())
        return False

    def write(self, table: str, data, key: str | None = None) -> int:
        """Validate `data` against schema/<table>.sql and stage it. Returns rows written.

        `key` names the work these rows are the result of (default: the run's work_key); at
        commit they replace earlier rows of the same table, partition and key. A pipeline run
        writes several kinds of work at once, e.g. images keyed by dataset and scores keyed by
        scorer, so re-running one piece replaces exactly that piece."""
        if self.state != "open":
            raise BadInput(f"Run {self.run_id} is {self.state}; start a new run with store.run(...).")
        ts = self.store._table(table)
        if table == "runs":
            raise BadInput("Table 'runs' is written by the store itself (one row per run at commit); "
                           "pass provenance as store.run(command, params).")
        if table in DERIVED_TABLES:
            raise BadInput(f"Table '{table}' is derived by the store from scores at commit; write scores instead.")
        arrow = conform(ts, data, fill={"run_id": self.run_id})
        if arrow.num_rows == 0:
            return 0
        for part, chunk in _split_partitions(ts, arrow):
            pdir = _part_dir(part)
            slot = (table, pdir, key or self.work_key)
            files = self._chunks.setdefault(slot, [])
            self._partitions[slot] = part
            d = self.staging / "chunks" / table / pdir / hashlib.sha1(slot[2].encode()).hexdigest()[:12]
            d.mkdir(parents=True, exist_ok=True)
            p = d / f"{len(files):05d}.parquet"
            pq.write_table(chunk.drop_columns(list(ts.partition)), p, compression="lz4")
            files.append(p)
        self.rows[table] = self.rows.get(table, 0) + arrow.num_rows
        return arrow.num_rows

    def _seal(self) -> list[dict]:
        """Sort each staged (table, partition) into one final file with the table's row-group size.
        Runs before the store lock is taken: sorting is the slow part and staging is private."""
        sealed = []
        if not self._chunks:
            return sealed
        con = _work_connection(self.staging)
        try:
            for i, ((table, pdir, wkey), files) in enumerate(sorted(self._chunks.items())):
                ts = self.store.schemas[table]
                name = f"{self.run_id}-{i}.parquet"
                out = self.staging / "sealed" / table / pdir / name
                out.parent.mkdir(parents=True, exist_ok=True)
                src = "[" + ", ".join(_sql_str(f) for f in files) + "]"
                cols = ", ".join(c.name for c in ts.file_columns)
                order = f" ORDER BY {', '.join(ts.sort)}" if ts.sort else ""
                rg = ROW_GROUP_ROWS.get(table, DEFAULT_ROW_GROUP)
                part = self._partitions[(table, pdir, wkey)]
                facts = {"table": table, "partition": part, "run_id": self.run_id, "work_key": wkey,
                         "replace": self.replace}
                con.execute(f"COPY (SELECT {cols} FROM read_parquet({src}){order}) TO {_sql_str(out)} "
                            f"(FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE {rg}, {_kv_sql(facts)})")
                _fsync(out)
                rows = pq.ParquetFile(out).metadata.num_rows
                sealed.append({"table": table, "partition": part, "src": out,
                               "columns": [c.name for c in ts.file_columns],
                               "path": f"tables/{table}/{pdir}/{name}" if pdir else f"tables/{table}/{name}",
                               "run_id": self.run_id, "work_key": wkey, "rows": rows,
                               "bytes": out.stat().st_size, "sha256": _sha256(out)})
        finally:
            con.close()
        return sealed

    def runs_row(self, status: str, error: str | None) -> dict:
        return {"run_id": self.run_id, "command": self.command, "params": json.dumps(self.params, sort_keys=True),
                "work_key": self.work_key, "versions": json.dumps(package_versions(), sort_keys=True),
                "git_rev": git_revision(), "host": socket.gethostname(), "started_at": self.started_at,
                "ended_at": _utcnow(), "status": status, "error": error,
                "tables": json.dumps(self.rows, sort_keys=True)}

    def commit(self) -> dict:
        """Make every row of this run visible at once (one manifest replace)."""
        if self.state != "open":
            raise BadInput(f"Run {self.run_id} is already {self.state}.")
        try:
            sealed = self._seal()
            self.summary = self.store._commit(self, sealed, "committed", None)
            self.state = "committed"
        except BaseException as e:
            if self.state == "open":
                self.fail(e)
            raise
        finally:
            self._cleanup()
        return self.summary

    def fail(self, exc: BaseException | str) -> None:
        """Discard the staged rows and record the run as failed."""
        if self.state != "open":
            return
        self.state = "failed"
        self._chunks.clear()
        msg = exc if isinstance(exc, str) else (f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
        try:
            self.store._commit(self, [], "failed", msg)
        finally:
            self._cleanup()

    def _cleanup(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def _split_partitions(ts: TableSchema, table: pa.Table) -> list[tuple[dict, pa.Table]]:
    """Rows grouped by their partition values (validated as safe directory names)."""
    if not ts.partition:
        return [({}, table)]
    import pyarrow.compute as pc

    combos = table.select(list(ts.partition)).group_by(list(ts.partition)).aggregate([]).to_pylist()
    for combo in combos:
        for col, value in combo.items():
            check_partition_value(ts.name, col, value)
    if len(combos) == 1:
        return [({c: combos[0][c] for c in ts.partition}, table)]
    out = []
    for combo in combos:
        mask = None
        for col in ts.partition:
            m = pc.equal(table.column(col), combo[col])
            mask = m if mask is None else pc.and_(mask, m)
        out.append(({c: combo[c] for c in ts.partition}, table.filter(mask)))
    return out


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


def open_store(path: str | os.PathLike, read_only: bool = False, create: bool | None = None) -> Store:
    """Alias of Store.open."""
    return Store.open(path, read_only=read_only, create=create)

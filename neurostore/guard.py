"""The SQL console guard: what the web UI (and anything else open to others) may run.

    db = SafeDB.from_store(Store.open(path, read_only=True), timeout=5.0, max_rows=1000)
    res = db.console("SELECT layer, count(*) FROM scores GROUP BY layer")   # -> ConsoleResult
    res.table, res.truncated, res.elapsed

Layers of defence, each enough on its own for the common attacks (DuckDB calls its settings
defence in depth, not a sandbox, so the application keeps its own checks too):

1. The statement: exactly one, and its type (from `duckdb.extract_statements`) is SELECT or
   EXPLAIN. COPY, ATTACH, INSTALL/LOAD, SET, PRAGMA, CREATE/DROP/INSERT, CALL are refused
   before DuckDB runs anything.
2. The connection: a *read-only* DuckDB database file that holds a snapshot of the store's
   committed tables, opened with `enable_external_access=false` (no file or network access from
   SQL: read_csv('/etc/passwd'), read_parquet, COPY ... TO, glob all fail) and
   `lock_configuration=true` (no SET can undo that). DuckDB refuses views over read_parquet once
   external access is off, so the tables are copied into the snapshot while it is still on.
3. Time and size: every statement runs with a deadline (a timer thread calls `interrupt()` on the
   statement's own cursor) and at most `max_rows` rows are fetched (`truncated` says when more
   existed).
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from .errors import QueryError

ALLOWED_TYPES = {duckdb.StatementType.SELECT: "SELECT", duckdb.StatementType.EXPLAIN: "EXPLAIN"}
DEFAULT_TIMEOUT = 5.0
DEFAULT_MAX_ROWS = 1000
# Tables bigger than this (committed Parquet bytes) are left empty in the snapshot: the snapshot is
# a full copy on local disk, and the web UI never needs e.g. a huge `pooled` table.
DEFAULT_MAX_TABLE_BYTES = 2 * 1024**3

# Settings of the locked connection; lock_configuration last so none can be changed back.
LOCKED_CONFIG = {
    "enable_external_access": False,
    "autoinstall_known_extensions": False,
    "autoload_known_extensions": False,
    "allow_community_extensions": False,
    "allow_unsigned_extensions": False,
    "lock_configuration": True,
}


class QueryRefused(QueryError):
    """SQL the console does not run (not a single SELECT/EXPLAIN)."""


class QueryTimeout(QueryError):
    """A statement stopped at the console's deadline."""


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def check_statement(sql: str) -> duckdb.Statement:
    """The single SELECT or EXPLAIN statement in `sql`, or QueryRefused saying why not."""
    if not sql or not sql.strip():
        raise QueryRefused("Empty query. Write one SELECT statement, e.g. SELECT * FROM models.")
    try:
        stmts = duckdb.extract_statements(sql)
    except duckdb.Error as e:
        raise QueryError(f"SQL does not parse: {_one_line(e)}") from None
    if len(stmts) != 1:
        raise QueryRefused(f"The console runs exactly one statement; this SQL has {len(stmts)}. "
                           "Remove the extra ';'-separated statements.")
    st = stmts[0]
    if st.type not in ALLOWED_TYPES:
        kind = str(st.type).rsplit(".", 1)[-1]
        raise QueryRefused(f"{kind} statements are not allowed in the console: it is read-only and runs only "
                           "SELECT or EXPLAIN (files, settings and the catalog cannot be touched). "
                           "Use 'neurostore sql' on your own machine for anything else.")
    return st


@dataclass
class ConsoleResult:
    sql: str
    params: dict
    table: pa.Table
    truncated: bool
    elapsed: float
    statement_type: str = "SELECT"
    named_query: str | None = None

    def to_dict(self) -> dict:
        return {"sql": self.sql, "params": self.params, "named_query": self.named_query,
                "statement_type": self.statement_type, "columns": self.table.column_names,
                "rows": [list(r.values()) for r in self.table.to_pylist()], "row_count": self.table.num_rows,
                "truncated": self.truncated, "elapsed_s": round(self.elapsed, 4)}


def snapshot_database(store, path: Path, max_table_bytes: int = DEFAULT_MAX_TABLE_BYTES) -> dict:
    """Copy the store's committed tables (one manifest) into a DuckDB database file at `path`,
    with the SQL macros. Returns {"tables": {name: rows}, "skipped": {name: reason}}."""
    from .sqlfuncs import prepare_connection

    man = store.manifest()
    info = {"tables": {}, "skipped": {}, "generation": man.get("generation")}
    con = duckdb.connect(str(path))
    try:
        for name in store.tables():
            entries = man.get("tables", {}).get(name, [])
            size = sum(e.get("bytes", 0) for e in entries)
            if size > max_table_bytes:
                # Keep the table (so SQL naming it still binds) but empty.
                info["skipped"][name] = f"{size / 1e9:.1f} GB of Parquet is above the web snapshot's limit"
                con.execute(f'CREATE TABLE "{name}" AS {store.view_sql(name, {"tables": {}})}')
            else:
                try:
                    con.execute(f'CREATE TABLE "{name}" AS {store.view_sql(name, man)}')
                except duckdb.Error as e:
                    # A damaged file empties its own table only: the rest of the store stays browsable.
                    info["skipped"][name] = str(store._query_error(e))
                    con.execute(f'CREATE TABLE "{name}" AS {store.view_sql(name, {"tables": {}})}')
            info["tables"][name] = con.execute(f'SELECT count(*) FROM "{name}"').fetchall()[0][0]
        # Table macros are checked against the UDFs when created, so register them here too; the
        # stored macros call them by name, and the read-only connection registers them again.
        prepare_connection(con, macros=True)
        con.execute("CHECKPOINT")
    finally:
        con.close()
    return info


def open_locked(path: Path) -> duckdb.DuckDBPyConnection:
    """The database file at `path`, read-only, with file/network access disabled and the
    configuration locked, plus the semantic UDFs."""
    from .sqlfuncs import prepare_connection

    con = duckdb.connect(str(path), read_only=True, config=dict(LOCKED_CONFIG))
    prepare_connection(con, macros=False)
    return con


def _convert_param(v: Any) -> Any:
    """Console parameters arrive as text: JSON numbers/booleans/null become typed, the rest stays text."""
    import json

    if not isinstance(v, str):
        return v
    try:
        out = json.loads(v)
    except ValueError:
        return v
    return out if isinstance(out, (int, float, bool)) or out is None else v


@dataclass
class SafeDB:
    """A locked, read-only snapshot of a store for the web UI. Every statement — the console's and
    the pages' own — runs through `run()` with a deadline and a row cap."""

    con: duckdb.DuckDBPyConnection
    tmpdir: Path | None = None
    timeout: float = DEFAULT_TIMEOUT
    max_rows: int = DEFAULT_MAX_ROWS
    info: dict = field(default_factory=dict)

    @classmethod
    def from_store(cls, store, timeout: float = DEFAULT_TIMEOUT, max_rows: int = DEFAULT_MAX_ROWS,
                   max_table_bytes: int = DEFAULT_MAX_TABLE_BYTES) -> "SafeDB":
        tmpdir = Path(tempfile.mkdtemp(prefix="neurostore-web-"))
        try:
            path = tmpdir / "snapshot.duckdb"
            info = snapshot_database(store, path, max_table_bytes=max_table_bytes)
            con = open_locked(path)
        except BaseException:
            shutil.rmtree(tmpdir, ignore_errors=True)
            raise
        db = cls(con=con, tmpdir=tmpdir, timeout=timeout, max_rows=max_rows, info=info)
        atexit.register(db.close)
        return db

    def close(self) -> None:
        if self.con is not None:
            try:
                self.con.close()
            finally:
                self.con = None
        if self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None

    def run(self, sql: str, params: dict | None = None, max_rows: int | None = None,
            timeout: float | None = None) -> tuple[pa.Table, bool, float]:
        """Run one statement on a cursor of its own: (table, truncated, seconds). Stops it at the
        deadline (QueryTimeout) and fetches at most `max_rows` rows."""
        if self.con is None:
            raise QueryError("The web database is closed; restart 'neurostore serve'.")
        limit = self.max_rows if max_rows is None else max_rows
        deadline = self.timeout if timeout is None else timeout
        cur = self.con.cursor()
        timer = threading.Timer(deadline, cur.interrupt)
        timer.daemon = True
        t0 = time.perf_counter()
        timer.start()
        try:
            rel = cur.sql(sql, params=params) if params else cur.sql(sql)
            if rel is None:
                return pa.table({}), False, time.perf_counter() - t0
            reader = rel.to_arrow_reader(min(max(limit, 1) + 1, 8192))
            batches, n = [], 0
            for batch in reader:
                batches.append(batch)
                n += batch.num_rows
                if n > limit:
                    break
            table = pa.Table.from_batches(batches, schema=reader.schema)
            truncated = table.num_rows > limit
            return table.slice(0, limit) if truncated else table, truncated, time.perf_counter() - t0
        except duckdb.InterruptException:
            raise QueryTimeout(f"Query stopped after {deadline:g} s, the time limit of this console. "
                               "Add a LIMIT or a WHERE on model/layer, or run it with 'neurostore sql'.") from None
        except duckdb.PermissionException as e:
            raise QueryRefused(f"Refused: {_one_line(e)}. The console cannot read or write files or reach "
                               "the network; query the store's tables instead (see /tables).") from None
        except duckdb.Error as e:
            raise QueryError(_one_line(e)) from None
        finally:
            timer.cancel()
            try:
                cur.close()
            except duckdb.Error:
                pass

    def console(self, sql: str, params: dict | None = None, max_rows: int | None = None,
                convert: bool = True) -> ConsoleResult:
        """Run untrusted SQL: one SELECT/EXPLAIN, values of its $names bound from `params` (text
        values that read as JSON numbers/booleans/null are typed when `convert`)."""
        st = check_statement(sql)
        given = dict(params or {})
        names = sorted(st.named_parameters)
        missing = [n for n in names if n not in given]
        if missing:
            raise QueryError(f"The query uses ${', $'.join(missing)} but no value was given. "
                             f"Pass them as URL parameters, e.g. ?{missing[0]}=VALUE.")
        bound = {n: _convert_param(given[n]) if convert else given[n] for n in names}
        table, truncated, elapsed = self.run(st.query, bound or None, max_rows=max_rows)
        return ConsoleResult(sql=sql, params=bound, table=table, truncated=truncated, elapsed=elapsed,
                             statement_type=ALLOWED_TYPES[st.type])

    def named(self, name: str, params: dict | None = None, max_rows: int | None = None) -> ConsoleResult:
        """Run a named query (queries/<name>.sql) with typed, bound parameters, under the same guard."""
        from .queries import get_query

        q = get_query(name)
        given = {k: v for k, v in (params or {}).items() if v not in (None, "")}
        bound = q.bind(given)
        res = self.console(q.sql, bound, max_rows=max_rows, convert=False)
        res.named_query = name
        return res

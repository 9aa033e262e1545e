"""Reading a store: one DuckDB view per table over its committed files (with the shims that keep
older stores readable), connections, SQL and named queries."""

from __future__ import annotations

import os
import re

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import QueryError, StoreDamaged, UnknownTable, unknown
from .derived import DERIVED_TABLES, derived_select
from .files import _sql_str, hive_types


class Views:
    """The Store's reading side (mixed into Store)."""

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
                return self._error_view(table, f"{bad[0]}{more}.")
        computed = [self._derived_view(table, model, score_files, root) for model, score_files in legacy.items()]
        if not files:
            if computed:
                return " UNION ALL ".join(computed)
            return f"{self._null_row(table)} LIMIT 0"
        paths = "[" + ", ".join(_sql_str(os.path.join(root, f) if root else f) for f in files) + "]"
        hive = f", hive_partitioning=true, hive_types={hive_types(ts.partition)}" if ts.partition else ", hive_partitioning=false"
        # Files written before a column was added to schema/ lack it: read them by name and
        # give the column NULL where no file has it, so an older store stays readable.
        per_file = [self._file_columns(e) or frozenset(c.name for c in ts.columns) for e in manifest["tables"][table]]
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
        return f"SELECT {cols} FROM ({derived_select(table, src, 'CAST(NULL AS VARCHAR)')})"

    def _null_row(self, table: str) -> str:
        """SELECT of one row of NULLs typed as the table's columns (for views with no file to read)."""
        return "SELECT " + ", ".join(f"CAST(NULL AS {c.type}) AS {c.name}" for c in self.schemas[table].columns)

    def _error_view(self, table: str, why: str) -> str:
        """A view whose every read fails with one line naming `why` and the check that finds it."""
        msg = (f"Table '{table}' cannot be read: {why} "
               f"Run 'neurostore check --store {self.path}' (--repair drops the damaged files).")
        return f"{self._null_row(table)} WHERE error({_sql_str(msg)})"

    def _file_columns(self, entry: dict) -> frozenset | None:
        """The columns a committed file holds (from the manifest, or its footer for manifests
        written before columns were recorded); files are immutable, so this is cached. None for
        a file whose footer cannot be read (missing or damaged: the queries that read it fail, and
        `check` names it), which a view then reads as holding every column."""
        if "columns" in entry:
            return frozenset(entry["columns"])
        path = entry["path"]
        if path not in self._columns_cache:
            try:
                self._columns_cache[path] = frozenset(pq.read_schema(self.path / path).names)
            except (OSError, pa.ArrowException):
                return None
        return self._columns_cache[path]

    def _create_views(self, con, manifest: dict) -> None:
        for name in self.schemas:
            try:
                con.execute(f'CREATE OR REPLACE VIEW "{name}" AS {self.view_sql(name, manifest)}')
            except duckdb.Error as e:   # a damaged file the size check cannot see (same size, bad bytes)
                con.execute(f'CREATE OR REPLACE VIEW "{name}" AS {self._error_view(name, str(e).splitlines()[0])}')

    def connect(self) -> duckdb.DuckDBPyConnection:
        """A new in-memory DuckDB connection with the committed tables as views, the macros and the
        semantic UDFs. The caller owns (and closes) it; views reflect the manifest at this moment."""
        from ..sqlfuncs import prepare_connection

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
        if self._reader is not None:
            return self._reader(query, params or None)
        with self._mutex:
            con = self._connection()

            def run():
                return con.sql(query, params=params) if params else con.sql(query)

            try:
                try:
                    rel = run()
                except duckdb.CatalogException as e:
                    gone = re.search(r"with name (\w+) does not exist", str(e))
                    if not (gone and gone.group(1) in self.schemas):
                        raise
                    # an earlier statement dropped a store view ('Unknown table scores. Did you mean
                    # scores?'): put the store's views back and ask again
                    self._create_views(con, self.manifest())
                    rel = run()
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
        if type(e) is duckdb.Error or re.search(r"TProtocolException|Invalid Parquet|No magic bytes|"
                                                r"Could not read enough bytes", msg, re.IGNORECASE):
            # bytes of a file overwritten in place, size unchanged: the Parquet reader's own error (the
            # bare duckdb.Error; SQL mistakes have their own classes), and it names no file
            return StoreDamaged(f"A file of the store cannot be read ({msg}). Run 'neurostore check --store "
                                f"{self.path}' to find it (--repair drops it).")
        m = re.search(r"Table with name (\w+) does not exist", msg)
        if m:
            return UnknownTable(unknown("table", m.group(1), self.schemas, "See 'neurostore tables'."))
        if "Parameter" in msg and ("missing" in msg.lower() or "not found" in msg.lower()):
            return QueryError(f"{msg} Give every $name the SQL uses a value in params.")
        if "LIMIT/OFFSET cannot be negative" in msg:   # a named query's top/k/limit below 0
            return QueryError("A count (top, k, limit) is negative; give 0 or more.")
        return QueryError(f"{msg.rstrip('.')}. See 'neurostore tables' and 'neurostore schema TABLE'.")

    def query(self, name: str, params: dict | None = None) -> pa.Table:
        """Run the named query `queries/<name>.sql` with typed, bound parameters."""
        from ..queries import get_query

        q = get_query(name)
        return self.sql(q.sql, q.bind(params or {}))

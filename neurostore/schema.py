"""The store's tables, read from `schema/*.sql` (DuckDB DDL is the single source of truth).

Each file holds one `CREATE TABLE` with a `--` comment on every column and header lines:
`-- partition: model, layer` (Hive directory columns), `-- sort: col, col DESC, ...` (the order the
writer sorts rows in) and `-- description: ...`. This module turns them into `TableSchema` objects
with Arrow types, and conforms incoming Arrow tables to them (`conform`), raising `SchemaMismatch`
with the table, the column and the expected type when they do not fit.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .resources import sql_dir
from .errors import SchemaMismatch, did_you_mean

# The schema/ folder (shipped in the wheel; see resources.py); NEUROSTORE_SCHEMA_DIR overrides it.
SCHEMA_DIR = Path(os.environ.get("NEUROSTORE_SCHEMA_DIR") or sql_dir("schema"))

_SCALARS: dict[str, pa.DataType] = {
    "BOOLEAN": pa.bool_(),
    "TINYINT": pa.int8(),
    "SMALLINT": pa.int16(),
    "INTEGER": pa.int32(),
    "BIGINT": pa.int64(),
    "FLOAT": pa.float32(),
    "DOUBLE": pa.float64(),
    "VARCHAR": pa.string(),
    "JSON": pa.string(),  # stored as text in Parquet; the views cast it back to JSON
    "BLOB": pa.binary(),
    "TIMESTAMP": pa.timestamp("us"),
    "DATE": pa.date32(),
}

_COLUMN_RE = re.compile(r"^\s*([a-z_][a-z0-9_]*)\s+([A-Z]+(?:\[\d*\])*)\s*,?\s*--\s*(.*?)\s*$")
_HEADER_RE = re.compile(r"^--\s*(partition|sort|description)\s*:\s*(.*?)\s*$")
_CREATE_RE = re.compile(r"^\s*CREATE\s+TABLE\s+([a-z_][a-z0-9_]*)\s*\(", re.I)


def duckdb_to_arrow(type_str: str) -> pa.DataType:
    """Arrow type of a DDL type: `INTEGER` -> int32, `FLOAT[]` -> list<float>, `FLOAT[384]` ->
    fixed_size_list<float, 384>."""
    m = re.fullmatch(r"([A-Z]+)((?:\[\d*\])*)", type_str.strip().upper())
    if not m or m.group(1) not in _SCALARS:
        raise ValueError(f"Unsupported DDL type {type_str!r}; supported: {sorted(_SCALARS)} and arrays.")
    t = _SCALARS[m.group(1)]
    for dims in re.findall(r"\[(\d*)\]", m.group(2)):
        t = pa.list_(t, int(dims)) if dims else pa.list_(t)
    return t


@dataclass(frozen=True)
class Column:
    name: str
    type: str  # DuckDB DDL type, e.g. 'INTEGER', 'FLOAT[]'
    comment: str

    @property
    def arrow(self) -> pa.DataType:
        return duckdb_to_arrow(self.type)


@dataclass(frozen=True)
class TableSchema:
    name: str
    description: str
    columns: tuple[Column, ...]
    partition: tuple[str, ...] = ()
    sort: tuple[str, ...] = ()
    path: Path | None = field(default=None, compare=False)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    @property
    def file_columns(self) -> list[Column]:
        """Columns stored inside the Parquet files (partition columns live in directory names)."""
        return [c for c in self.columns if c.name not in self.partition]

    def column(self, name: str) -> Column:
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(name)

    def arrow_schema(self, with_partition: bool = True) -> pa.Schema:
        cols = self.columns if with_partition else self.file_columns
        return pa.schema([pa.field(c.name, c.arrow) for c in cols])


def parse_ddl(text: str, path: Path | None = None) -> TableSchema:
    """One table from the text of a schema file."""
    headers: dict[str, str] = {}
    name = None
    columns: list[Column] = []
    where = path.name if path else "<ddl>"
    for line in text.splitlines():
        if name is None:
            h = _HEADER_RE.match(line.strip())
            if h:
                headers[h.group(1)] = h.group(2)
                continue
            c = _CREATE_RE.match(line)
            if c:
                name = c.group(1)
            continue
        if line.strip().startswith(")"):
            break
        if not line.strip() or line.strip().startswith("--"):
            continue
        m = _COLUMN_RE.match(line)
        if not m:
            # A schema file is written by developers: a bad line is a bug, not a user error.
            raise ValueError(f"{where}: cannot parse column line {line.strip()!r} (need 'name TYPE, -- comment').")
        duckdb_to_arrow(m.group(2))
        columns.append(Column(m.group(1), m.group(2), m.group(3)))
    if name is None or not columns:
        raise ValueError(f"{where}: no CREATE TABLE with columns found.")
    split = lambda s: tuple(x.strip() for x in s.split(",") if x.strip())  # noqa: E731
    ts = TableSchema(name, headers.get("description", ""), tuple(columns), split(headers.get("partition", "")),
                     split(headers.get("sort", "")), path)
    # A sort column may say DESC (e.g. 'n_units DESC': a table read most-frequent first).
    for col in ts.partition + tuple(re.sub(r"\s+(ASC|DESC)$", "", c, flags=re.I) for c in ts.sort):
        if col not in ts.names:
            raise ValueError(f"{where}: header names column {col!r}, which the table does not have.")
    return ts


@functools.lru_cache(maxsize=8)
def _load(schema_dir: str) -> dict[str, TableSchema]:
    tables = {}
    for p in sorted(Path(schema_dir).glob("*.sql")):
        ts = parse_ddl(p.read_text(), p)
        if ts.name != p.stem:
            raise ValueError(f"{p}: table {ts.name!r} must live in a file named {ts.name}.sql.")
        tables[ts.name] = ts
    return tables


def load_schemas(schema_dir: Path | None = None) -> dict[str, TableSchema]:
    """Every table, keyed by name."""
    return dict(_load(str(schema_dir or SCHEMA_DIR)))


def schema_version(schema_dir: Path | None = None) -> int:
    """The schema version of this code (schema/version.txt)."""
    return int((Path(schema_dir or SCHEMA_DIR) / "version.txt").read_text().strip())


def vector_column(m, mask=None) -> pa.Array:
    """[n, d] float matrix -> the FLOAT[d] column of `embeddings` (a fixed-size list per row);
    `mask` ([n] bool, optional) marks NULL rows."""
    m = np.ascontiguousarray(m, dtype=np.float32)  # [n, d]
    return pa.FixedSizeListArray.from_arrays(pa.array(m.ravel(), pa.float32()), m.shape[1],
                                             mask=None if mask is None else pa.array(mask, pa.bool_()))


# ---- conforming incoming data -----------------------------------------------------------------


def to_arrow(data) -> pa.Table:
    """Arrow table from an Arrow table/batch, a pandas DataFrame or anything with `to_arrow()`."""
    if isinstance(data, pa.Table):
        return data
    if isinstance(data, pa.RecordBatch):
        return pa.Table.from_batches([data])
    if hasattr(data, "to_arrow"):  # polars
        return data.to_arrow()
    try:
        import pandas as pd

        if isinstance(data, pd.DataFrame):
            return pa.Table.from_pandas(data, preserve_index=False)
    except ImportError:  # pandas is optional for writers
        pass
    if isinstance(data, dict):
        return pa.table(data)
    raise TypeError(f"Cannot write {type(data).__name__}; pass a pyarrow Table, a pandas DataFrame or a dict of columns.")


def _kind(t: pa.DataType) -> str:
    if pa.types.is_null(t):
        return "null"
    if pa.types.is_dictionary(t):
        return _kind(t.value_type)
    if pa.types.is_integer(t):
        return "int"
    if pa.types.is_floating(t):
        return "float"
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "string"
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
        return "binary"
    if pa.types.is_boolean(t):
        return "bool"
    if pa.types.is_timestamp(t):
        return "timestamp"
    if pa.types.is_date(t):
        return "date"
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t) or pa.types.is_list_view(t):
        return "list"
    return str(t)


# Which incoming kinds may be cast to a target kind (safe widenings and checked narrowings).
_ALLOWED = {
    "int": {"int", "null"},
    "float": {"float", "int", "null"},
    "string": {"string", "null"},
    "binary": {"binary", "string", "null"},
    "bool": {"bool", "null"},
    "timestamp": {"timestamp", "null"},
    "date": {"date", "timestamp", "null"},
    "list": {"list", "null"},
}


def _compatible(src: pa.DataType, dst: pa.DataType) -> bool:
    sk, dk = _kind(src), _kind(dst)
    if sk not in _ALLOWED.get(dk, {dk}):
        return False
    if dk == "list" and sk == "list":
        return _compatible(src.value_type, dst.value_type)
    return True


def _cast(arr, src: pa.DataType, dst: pa.DataType):
    if pa.types.is_dictionary(src):
        arr = arr.cast(src.value_type)
        src = src.value_type
    if pa.types.is_timestamp(src) and src.tz is not None and pa.types.is_timestamp(dst):
        arr = pc.cast(arr, pa.timestamp(src.unit, "UTC")).cast(pa.timestamp(src.unit))  # UTC, naive
    if pa.types.is_fixed_size_list(dst) and not pa.types.is_fixed_size_list(src):
        lengths = pc.list_value_length(arr)
        bad = pc.and_(pc.is_valid(lengths), pc.not_equal(lengths, dst.list_size))
        if pc.any(bad).as_py():
            raise ValueError(f"arrays must have exactly {dst.list_size} values")
    # Integers are cast with overflow checks; float narrowing (float64 -> float32) is allowed.
    safe = not (_kind(dst) in ("float", "list"))
    return pc.cast(arr, dst, safe=safe)


def conform(ts: TableSchema, data, fill: dict | None = None) -> pa.Table:
    """`data` as an Arrow table with exactly the columns and types of `ts`, in DDL order.

    `fill` gives values for columns the store sets itself (e.g. run_id); they may be absent from
    `data` and override it. Missing or extra columns and incompatible types raise SchemaMismatch.
    """
    table = to_arrow(data)
    fill = fill or {}
    got = table.column_names
    dup = {c for c in got if got.count(c) > 1}
    if dup:
        raise SchemaMismatch(f"Table '{ts.name}': column '{sorted(dup)[0]}' appears more than once. Pass each column once.")
    extra = [c for c in got if c not in ts.names]
    if extra:
        c = extra[0]
        raise SchemaMismatch(
            f"Table '{ts.name}' has no column '{c}'.{did_you_mean(c, ts.names)} Columns: {', '.join(ts.names)}. "
            f"See 'neurostore schema {ts.name}'."
        )
    arrays = []
    n = table.num_rows
    for col in ts.columns:
        dst = col.arrow
        if col.name in fill:
            arrays.append(pa.array([fill[col.name]] * n, dst))
            continue
        if col.name not in got:
            raise SchemaMismatch(
                f"Table '{ts.name}' is missing column '{col.name}' ({col.type}: {col.comment}). "
                f"Add it (NULLs are allowed). See 'neurostore schema {ts.name}'."
            )
        arr = table.column(col.name)
        src = arr.type
        if src == dst:
            arrays.append(arr)
            continue
        if not _compatible(src, dst):
            raise SchemaMismatch(
                f"Table '{ts.name}', column '{col.name}': expected {col.type}, got Arrow type {src}. "
                f"Convert the column to {col.type} before writing."
            )
        try:
            arrays.append(_cast(arr, src, dst))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as e:
            reason = str(e).splitlines()[0]
            raise SchemaMismatch(
                f"Table '{ts.name}', column '{col.name}': values do not fit {col.type} ({reason}). "
                f"Convert the column to {col.type} before writing."
            ) from None
    return pa.Table.from_arrays(arrays, schema=ts.arrow_schema())

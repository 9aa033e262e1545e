"""The files of a store, below any table logic: names and partition folders, atomic writes,
hashes, the facts each Parquet footer records, the writer lock and the private work connection.
Every other module of the store writes through these."""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
import re
import secrets
import time
from pathlib import Path
from typing import Any, BinaryIO, Callable

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import SchemaMismatch
from ..schema import TableSchema

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
# A pooled row holds a layer's every unit twice (16 KB for 2,048 units): the default row group
# would be 2 GB, one unit of reading and of memory for a reader; 2,048 rows is 32 MB.
ROW_GROUP_ROWS["pooled"] = 2048
DEFAULT_ROW_GROUP = 122_880
# A partition's rows staged as its final files are cut into files of this much Arrow data at most
# (at row-group boundaries), each encoded in a thread of its own: a 50,000-image dissect's layer4
# pooled rows (820 MB, half of the pooled bytes) would otherwise be one thread's work.
FILE_BYTES = 128 << 20

# A staging folder without a held lock this old belongs to a dead writer.
STALE_STAGING_SECONDS = 60.0

# Every committed file carries, in its Parquet key-value metadata under this key, what its manifest
# entry needs besides size and hash (table, partition, run_id, work_key, replace; a runs file also
# the manifest generation it committed), so a lost manifest can be rebuilt from the files alone.
KV_KEY = "neurostore"
# Committed files are named after their run: <run_id>-<n>.parquet, <run_id>-<table>.parquet, runs/<run_id>.parquet.
RUN_FILE = re.compile(r"^(\d{8}T\d{6}Z-[0-9a-f]{8})(?:-[^/]*)?\.parquet$")

PARTITION_RULES = {
    "model": (re.compile(r"^[a-z0-9][a-z0-9_.\-]*$"), "lowercase letters, digits and _ . - (e.g. 'resnet50')"),
    "layer": (re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.]*$"), "a module path of letters, digits, _ and . (e.g. 'layer3.1.conv2')"),
}


def hive_types(partition) -> str:
    """DuckDB hive_types for a table's partition columns: always text (a layer named '0' stays '0')."""
    return "{" + ", ".join(f"'{c}': VARCHAR" for c in partition) + "}"


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


def _fsync(path: Path) -> None:
    """fsync a file or a folder (a folder's entry list: makes a rename durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, content: str | Callable[[BinaryIO], None]) -> None:
    """Write, fsync, then os.replace: readers see the old file or the new one, never a mix.
    `content`: text, or a function that writes the bytes to the open file (torch.save)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(3)}.tmp")
    with open(tmp, "wb") as f:
        if isinstance(content, str):
            f.write(content.encode())
        else:
            content(f)
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


def _kv_arrow(meta: dict) -> dict:
    """The same facts as Arrow schema metadata, for a file pyarrow writes."""
    return {KV_KEY: json.dumps(meta, sort_keys=True)}


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


def _reason(e: Exception) -> str:
    """A decode error in a few words, on one line."""
    return " ".join(f"{type(e).__name__}: {e}".split())[:120]


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


def _parquet_options(schema: pa.Schema) -> dict:
    """How a file the store writes with pyarrow is encoded (the values read back are the same
    whatever it is): zstd; dictionaries only for flat columns other than floats (building one for
    millions of distinct floats before falling back to plain encoding took half the time); floats
    inside lists (pooled activations, vectors, histograms) byte-stream-split, and without min/max
    statistics, which no query prunes by: pooled rows take 72% of the bytes and ~70% of the
    encoding time they took as plain floats with statistics (bench/store_write.py)."""
    flat, split, stats = [], [], []
    for f in schema:
        if pa.types.is_list(f.type) and pa.types.is_floating(f.type.value_type):
            split.append(f"{f.name}.list.element")
            continue
        stats += _leaf_paths(f.name, f.type)
        if not (pa.types.is_floating(f.type) or pa.types.is_nested(f.type)):
            flat.append(f.name)
    return {"compression": "zstd", "use_dictionary": flat, "use_byte_stream_split": split or False,
            "write_statistics": stats}


def _file_slices(t: pa.Table, row_group: int) -> list[pa.Table]:
    """`t` cut at row-group boundaries into zero-copy slices of FILE_BYTES of Arrow data at most."""
    if t.num_rows == 0 or t.nbytes <= FILE_BYTES:
        return [t]
    rows = max(row_group, int(FILE_BYTES * t.num_rows / t.nbytes) // row_group * row_group)
    return [t.slice(a, rows) for a in range(0, t.num_rows, rows)]


def _leaf_paths(name: str, typ: pa.DataType) -> list[str]:
    """Parquet's column paths of an Arrow column ('m' list<list<int8>> -> 'm.list.element.list.element')."""
    if pa.types.is_list(typ) or pa.types.is_large_list(typ):
        return _leaf_paths(f"{name}.list.element", typ.value_type)
    if pa.types.is_struct(typ):
        return [p for f in typ for p in _leaf_paths(f"{name}.{f.name}", f.type)]
    return [name]


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
    # Rows usually come one partition after another (a table built layer by layer): then each
    # partition is a zero-copy slice. Filtering copies every row (~7 s of a 50,000-image dissect's
    # pooled rows).
    starts = _run_starts(table.select(list(ts.partition)))
    if len(starts) == len(combos):
        ends = starts[1:] + [table.num_rows]
        return [({c: table.column(c)[a].as_py() for c in ts.partition}, table.slice(a, b - a))
                for a, b in zip(starts, ends)]
    out = []
    for combo in combos:
        mask = None
        for col in ts.partition:
            m = pc.equal(table.column(col), combo[col])
            mask = m if mask is None else pc.and_(mask, m)
        out.append(({c: combo[c] for c in ts.partition}, table.filter(mask)))
    return out


def _run_starts(keys: pa.Table) -> list[int]:
    """Row indices where the values of `keys` (non-null columns) differ from the row before: the
    first row of each run of equal rows."""
    import numpy as np
    import pyarrow.compute as pc

    n = keys.num_rows
    change = np.zeros(max(n - 1, 0), bool)
    for col in keys.columns:
        change |= pc.not_equal(col.slice(0, n - 1), col.slice(1)).to_numpy(zero_copy_only=False)
    return [0] + (np.flatnonzero(change) + 1).tolist()

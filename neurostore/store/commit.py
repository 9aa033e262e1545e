"""Manifest and commit: the manifest (which files are committed), runs (every write belongs to
one), and the commit that makes a run's files visible at once. See docs/store.md for the protocol."""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import functools
import hashlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .. import __version__
from ..errors import BadInput, StoreDamaged
from ..schema import conform
from ..signals import COMMITTED_WHILE_STOPPING, held
from .derived import DERIVED_TABLES, derived_select
from .files import (DEFAULT_ROW_GROUP, ROW_GROUP_ROWS, _atomic_write, _file_slices, _fsync, _kv_arrow, _kv_sql, _locked,
                    _parquet_options, _part_dir, _reason, _sha256, _split_partitions, _sql_str, _utcnow, _work_connection)

if TYPE_CHECKING:
    from .core import Store

VERSION_PACKAGES = ("neurostore", "duckdb", "pyarrow", "numpy", "pandas", "torch", "torchvision", "open_clip_torch",
                    "timm", "sentence-transformers")


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
    repo = Path(__file__).resolve().parents[2]
    if not (repo / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _manifest_problem(man) -> str | None:
    """What makes a parsed manifest unusable (wrong JSON type, missing keys), or None."""
    if not isinstance(man, dict):
        return f"a JSON {type(man).__name__}, not an object"
    if man.get("format") != "neurostore-manifest" or not isinstance(man.get("tables"), dict) \
            or not isinstance(man.get("retired", []), list):
        return "not a neurostore manifest: no format, tables or retired list"
    if not isinstance(man.get("generation", 0), int):
        return f"generation {man.get('generation')!r} is not a whole number"
    for table, entries in man["tables"].items():
        if not isinstance(entries, list) or not all(
                isinstance(e, dict) and isinstance(e.get("path"), str) and isinstance(e.get("partition"), dict)
                for e in entries):
            return f"table '{table}' has malformed entries"
        outside = next((e["path"] for e in entries if not _inside(e["path"])), None)
        if outside:   # a repair would move it, a reader read it: never a file outside the store
            return f"table '{table}' lists '{outside}', a path outside the store's tables/"
    if not all(isinstance(r, dict) and isinstance(r.get("path"), str) for r in man.get("retired", [])):
        return "malformed retired list"
    outside = next((r["path"] for r in man.get("retired", []) if not _inside(r["path"])), None)
    if outside:   # the garbage collector would delete it
        return f"the retired list names '{outside}', a path outside the store's tables/"
    return None


def _inside(path: str) -> bool:
    """A manifest path that stays in the store's tables/ (relative, no '..')."""
    parts = Path(path).parts
    return bool(parts) and parts[0] == "tables" and ".." not in parts and not Path(path).is_absolute()


def _empty_manifest() -> dict:
    return {"format": "neurostore-manifest", "generation": 0, "updated_at": None, "tables": {}, "retired": []}


class Commits:
    """The Store's manifest and writes: runs, staging, the commit that makes a run visible, and
    the derived tables recomputed in the same commit (mixed into Store)."""

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

    # ---- writing ---------------------------------------------------------------------------

    def _check_writable(self) -> None:
        if self.read_only:
            raise BadInput(f"Store '{self.path}' was opened read-only; open it with read_only=False to write.")

    def run(self, command: str, params: dict | None = None, work_key: str | None = None,
            replace: str = "work", started_at: "dt.datetime | float | None" = None) -> "Run":
        """A run: every write belongs to one. Use as a context manager: commits on normal exit,
        records a failed run (and keeps none of its rows) on an exception.

        started_at: when the work began (a UTC datetime or a time.time() value), for work that
        computes first and opens its run only to write (a dissect); default: now.

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
        return Run(self, command, params or {}, work_key, replace, started_at)

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
            run.state = status   # visible now: nothing after this may record the run as failed
            try:
                self._write_load_sql(man)
            except Exception:   # e.g. a full disk: the run stands; `check` names the stale load.sql
                pass
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
        pq.write_table(arrow.replace_schema_metadata(_kv_arrow(facts)), tmp)
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
                con.execute(f"COPY ({derived_select(table, src, _sql_str(run.run_id))}) TO {_sql_str(dest)} "
                            f"(FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE {rg}, {_kv_sql(facts)})")
                _fsync(dest)
                tables[table].append({"path": rel, "run_id": run.run_id, "work_key": f"derived:{table}",
                                      "partition": {"model": model}, "rows": pq.ParquetFile(dest).metadata.num_rows,
                                      "bytes": dest.stat().st_size, "sha256": _sha256(dest),
                                      "columns": [c.name for c in self.schemas[table].file_columns]})
        finally:
            if con is not None:
                con.close()


class Run:
    """One unit of work. Rows written through it are staged privately and become visible
    all at once when it commits; a crash or an exception leaves none of them visible."""

    def __init__(self, store: Store, command: str, params: dict, key: str | None, replace: str,
                 started_at: "dt.datetime | float | None" = None):
        self.store = store
        self.command = command
        self.params = json.loads(json.dumps(params, default=str))  # what is recorded is what is keyed
        self.work_key = key or work_key(command, self.params)
        self.replace = replace
        if isinstance(started_at, (int, float)):
            started_at = dt.datetime.fromtimestamp(started_at, dt.timezone.utc).replace(tzinfo=None)
        self.started_at = started_at or _utcnow()
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
        self._final: set[tuple] = set()   # slots whose staged files are already the sealed files
        self._sealed_facts: dict[Path, dict] = {}   # a final slot's staged file: bytes and sha256, once synced
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
        jobs = []
        for part, chunk in _split_partitions(ts, arrow):
            pdir = _part_dir(part)
            slot = (table, pdir, key or self.work_key)
            files = self._chunks.setdefault(slot, [])
            self._partitions[slot] = part
            d = self.staging / "chunks" / table / pdir / hashlib.sha1(slot[2].encode()).hexdigest()[:12]
            d.mkdir(parents=True, exist_ok=True)
            body = chunk.select([c.name for c in ts.file_columns])
            # A slot's first chunk, already in the table's order, is written as the sealed files
            # would be: if no other chunk follows, sealing only moves them (re-reading, sorting and
            # recompressing a 50,000-image dissect's pooled rows, 3 GB, was most of its store stage).
            final = not files and _is_sorted(body, ts.sort)
            if final:
                self._final.add(slot)
            else:
                self._final.discard(slot)
            for piece in _file_slices(body, ROW_GROUP_ROWS.get(table, DEFAULT_ROW_GROUP)) if final else [body]:
                p = d / f"{len(files):05d}.parquet"
                files.append(p)
                jobs.append((slot, p, piece, final))
        # Each file is encoded, synced and hashed in a thread of its own (pyarrow and hashlib
        # release the GIL): the 5 layers of a pooled write at once, its large ones in several
        # files. A failure in any of them raises here, after all have stopped, and fails the run.
        if len(jobs) == 1:
            self._stage(*jobs[0])
        else:
            with ThreadPoolExecutor(min(len(jobs), os.cpu_count() or 1)) as pool:
                list(pool.map(lambda job: self._stage(*job), jobs))
        self.rows[table] = self.rows.get(table, 0) + arrow.num_rows
        return arrow.num_rows

    def _stage(self, slot: tuple, path: Path, body: pa.Table, final: bool) -> None:
        """Write one staged chunk: a final one as its sealed file (footer facts, row groups,
        encodings, fsync and hash done here, so sealing only moves it), any other as a quick lz4
        chunk for sealing to sort."""
        if not final:
            pq.write_table(body, path, compression="lz4")
            return
        pq.write_table(body.replace_schema_metadata(_kv_arrow(self._facts(slot))), path,
                       row_group_size=ROW_GROUP_ROWS.get(slot[0], DEFAULT_ROW_GROUP), **_parquet_options(body.schema))
        _fsync(path)
        self._sealed_facts[path] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}

    def _facts(self, slot: tuple) -> dict:
        """The manifest facts a sealed file of (table, partition dir, work key) records in its footer."""
        table, _, wkey = slot
        return {"table": table, "partition": self._partitions[slot], "run_id": self.run_id, "work_key": wkey,
                "replace": self.replace}

    def _seal(self) -> list[dict]:
        """Sort each staged (table, partition) into one final file with the table's row-group size.
        Runs before the store lock is taken: sorting is the slow part and staging is private."""
        sealed = []
        if not self._chunks:
            return sealed
        con = _work_connection(self.staging)
        try:
            n = 0   # sealed files so far: they are named <run_id>-<n>.parquet
            for (table, pdir, wkey), files in sorted(self._chunks.items()):
                ts = self.store.schemas[table]
                folder = self.staging / "sealed" / table / pdir
                folder.mkdir(parents=True, exist_ok=True)
                outs = []   # (sealed file, its bytes and sha256), in row order
                if (table, pdir, wkey) in self._final:   # a sorted first chunk, sealed by write: move it
                    for f in files:
                        outs.append((folder / f"{self.run_id}-{n}.parquet", self._sealed_facts[f]))
                        os.replace(f, outs[-1][0])
                        n += 1
                else:
                    out = folder / f"{self.run_id}-{n}.parquet"
                    n += 1
                    src = "[" + ", ".join(_sql_str(f) for f in files) + "]"
                    cols = ", ".join(c.name for c in ts.file_columns)
                    order = f" ORDER BY {', '.join(ts.sort)}" if ts.sort else ""
                    rg = ROW_GROUP_ROWS.get(table, DEFAULT_ROW_GROUP)
                    con.execute(f"COPY (SELECT {cols} FROM read_parquet({src}){order}) TO {_sql_str(out)} "
                                f"(FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE {rg}, "
                                f"{_kv_sql(self._facts((table, pdir, wkey)))})")
                    _fsync(out)
                    outs.append((out, {"bytes": out.stat().st_size, "sha256": _sha256(out)}))
                for out, facts in outs:
                    sealed.append({"table": table, "partition": self._partitions[(table, pdir, wkey)], "src": out,
                                   "columns": [c.name for c in ts.file_columns],
                                   "path": f"tables/{table}/{pdir}/{out.name}" if pdir else f"tables/{table}/{out.name}",
                                   "run_id": self.run_id, "work_key": wkey,
                                   "rows": pq.ParquetFile(out).metadata.num_rows, **facts})
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
            with held() as stops:   # a stop waits for the commit's end: once the manifest is swapped the run is in
                self.summary = self.store._commit(self, sealed, "committed", None)
                if stops:
                    COMMITTED_WHILE_STOPPING.append(self.run_id)
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


def _is_sorted(t: pa.Table, keys: Sequence[str]) -> bool:
    """`t` is in the order ORDER BY `keys` gives (ascending; ties in any order): a linear check.
    False where that order is not plain comparison (NULLs, floating-point keys: NaN)."""
    if not keys or t.num_rows < 2:   # no order asked (COPY keeps the rows' order) or nothing to order
        return True
    undecided = None   # [n - 1] pairs equal on every key so far
    for k in keys:
        col = t.column(k)
        if col.null_count or pa.types.is_floating(col.type):
            return False
        a, b = col.slice(0, len(col) - 1), col.slice(1)
        later_smaller = pc.greater(a, b)
        if undecided is not None:
            later_smaller = pc.and_(undecided, later_smaller)
        if pc.any(later_smaller).as_py():
            return False
        eq = pc.equal(a, b)
        undecided = eq if undecided is None else pc.and_(undecided, eq)
    return True

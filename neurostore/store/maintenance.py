"""Keeping a store sound: garbage collection (retired files after a grace period, files of runs
that never committed, dead staging folders) and `check`, which verifies every committed file and,
with repair, writes a manifest of what verifies, setting the rest aside (never deleting data)."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import shutil
import time
from pathlib import Path

import pyarrow.parquet as pq

from .. import __version__
from ..errors import StoreDamaged
from ..schema import schema_version
from .commit import Run, _empty_manifest
from .derived import DERIVED_TABLES
from .files import (FORMAT, FORMAT_VERSION, RUN_FILE, _atomic_write, _file_facts, _file_run_id, _reason, _sha256,
                    _staging_is_dead, _table_of, _utcnow)

# Files dropped from the manifest (replaced by a re-run) are deleted only after this many seconds,
# so a reader whose query started on the previous manifest never finds a file missing.
GRACE_SECONDS = 300.0
# Where `check --repair` moves files it takes out of tables/ (damaged or unknown): set aside, never deleted.
SET_ASIDE = "damaged"


class Maintenance:
    """The Store's garbage collection and check/repair (mixed into Store)."""

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
        an unlisted file is garbage when its run (from its footer or its name) failed, was killed
        before its runs row (its staging folder is still here), or wrote it for the commit right
        after this manifest and was killed before the swap. A file of a committed run, or of no
        run this store knows (copied in), is never garbage. `status`: each run's status in the
        manifest."""
        run_id = _file_run_id(f)
        if run_id is None:
            return None
        if status.get(run_id) == "failed":
            return f"written by run {run_id}, which failed"
        if run_id in status:
            return None
        runs_file = self.path / "tables/runs" / f"{run_id}.parquet"
        if not runs_file.exists():   # killed before its runs row, if its staging folder says it ran here
            if (self.path / "staging" / run_id).is_dir():
                return f"written by run {run_id}, killed before its commit (no runs row)"
            return None   # no trace of the run in this store: a file copied in from elsewhere

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
        if man is not None and (stale_sql := self._load_sql_lags(man)):
            problems.append({"path": "load.sql", "table": None, "rows": None, "problem": stale_sql})
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
                  "checkpoints": self._checkpoints(now), "repaired": False}
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

    def _load_sql_lags(self, man: dict) -> str | None:
        """Why load.sql does not read this manifest's files (a command stopped between its commit
        and the rewrite of load.sql), or None. Only the files are compared: the macros it carries
        change with neurostore's version, which is no damage."""
        files = re.compile(r"'(tables/[^']+\.parquet)'")
        want = set(files.findall(self._load_sql(man, root="")))
        try:
            have = set(files.findall((self.path / "load.sql").read_text()))
        except OSError:   # a store nothing has committed to yet has none, and needs none
            return "missing: plain DuckDB has no views to load ('check --repair' writes it)" if want else None
        if have != want:
            return "stale: it reads another snapshot's files than the manifest's ('check --repair' rewrites it)"
        return None

    def _checkpoints(self, now: float) -> list[dict]:
        """The files of interrupted commands in checkpoints/ (the same command resumes from them and
        removes them at its commit; one never run again leaves them): not the store's data, never
        touched by a check, but space a user should see."""
        out = []
        for f in sorted((self.path / "checkpoints").glob("*")):
            try:
                st = f.stat()
            except OSError:
                continue
            out.append({"path": self._rel(f), "bytes": st.st_size, "age_hours": round((now - st.st_mtime) / 3600, 1)})
        return out

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

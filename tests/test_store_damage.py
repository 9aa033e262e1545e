"""Damaged stores on real DuckDB and Parquet: every way a store folder can be damaged gives a
one-line error or a clean repair, and no case loses a committed row that was intact."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_cli_store import run_cli  # noqa: E402
from test_store import scores_table  # noqa: E402

from neurostore.store import DERIVED_TABLES  # noqa: E402
from neurostore.store.files import _sha256  # noqa: E402
from neurostore.errors import StoreDamaged  # noqa: E402
from neurostore.store import Store, check  # noqa: E402

DERIVED = set(DERIVED_TABLES)


def concepts(*names, vocabulary="v"):
    return {"vocabulary": [vocabulary] * len(names), "concept": list(names), "category": [None] * len(names)}


def build_store(path: Path) -> Path:
    """A small real store: several runs, tables and partitions, a re-run whose replaced files are
    still on disk (retired, within the grace period), a replace='partition' run and a failed run."""
    with Store.open(path) as s:
        with s.run("dissect", {"model": "m1"}) as run:
            run.write("scores", scores_table("m1", "layer1", 10, seed=1))
            run.write("scores", scores_table("m1", "layer2", 8, seed=2))
            run.write("concepts", concepts("a", "b", "c"))
        with s.run("dissect", {"model": "m2"}) as run:
            run.write("scores", scores_table("m2", "layer1", 12, seed=3))
        with s.run("dissect", {"model": "m1"}) as run:  # re-run: replaces the first run's m1 files
            run.write("scores", scores_table("m1", "layer1", 6, seed=4))
            run.write("scores", scores_table("m1", "layer2", 7, seed=5))
        with s.run("dissect", {"model": "m2", "other": 1}, replace="partition") as run:
            run.write("scores", scores_table("m2", "layer1", 9, seed=6))
        s.write("concepts", concepts("d", "e", vocabulary="w"))
        with pytest.raises(RuntimeError):
            with s.run("boom") as run:
                run.write("concepts", concepts("z"))
                raise RuntimeError("failed on purpose")
        assert s.manifest()["retired"], "the fixture needs replaced files still on disk"
    return path


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    return build_store(tmp_path_factory.mktemp("damage") / "st")


@pytest.fixture
def st(template, tmp_path):
    path = tmp_path / "st"
    shutil.copytree(template, path)
    return path


def row_counts(path: Path) -> dict[str, int]:
    with Store.open(path, read_only=True) as s:
        return {t: s.sql(f'SELECT count(*) AS n FROM "{t}"').column("n")[0].as_py() for t in s.tables()}


def files(path: Path) -> set[str]:
    return {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file() and p.name != ".lock"}


def entry(path: Path, table: str, where: str) -> dict:
    man = json.loads((path / "manifest.json").read_text())
    return next(e for e in man["tables"][table] if where in e["path"])


def one_line(e: BaseException) -> str:
    msg = str(e)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


# ---- the damage cases ---------------------------------------------------------------------------
# Each returns (table, rows) of the committed file whose rows may be lost, or None.

def manifest_missing(p):
    (p / "manifest.json").unlink()


def manifest_truncated(p):
    m = p / "manifest.json"
    m.write_bytes(m.read_bytes()[: m.stat().st_size // 2])


def manifest_garbage(p):
    (p / "manifest.json").write_bytes(bytes(range(256)) * 4)


def manifest_list(p):
    (p / "manifest.json").write_text("[1, 2, 3]")


def manifest_number(p):
    (p / "manifest.json").write_text("42")


def manifest_generation_text(p):
    man = json.loads((p / "manifest.json").read_text())
    (p / "manifest.json").write_text(json.dumps({**man, "generation": "abc"}))   # a repair crashed on int()


def manifest_path_outside(p):
    """An entry naming a file outside the store: the repair moved it into damaged/ (outside it too)."""
    (p.parent / "outside").mkdir(exist_ok=True)
    (p.parent / "outside" / "victim.parquet").write_text("precious")
    man = json.loads((p / "manifest.json").read_text())
    man["tables"]["models"] = [{**entry(p, "concepts", "tables/concepts"), "path": "../outside/victim.parquet",
                                "partition": {}}]
    (p / "manifest.json").write_text(json.dumps(man))


def store_json_garbage(p):
    (p / "store.json").write_bytes(b"\xff\xfe{not json")


def store_json_missing(p):
    (p / "store.json").unlink()


def parquet_deleted(p):
    e = entry(p, "scores", "model=m1/layer=layer2")
    (p / e["path"]).unlink()
    return "scores", e["rows"], e["path"]


def parquet_truncated(p):
    e = entry(p, "scores", "model=m2/layer=layer1")
    f = p / e["path"]
    f.write_bytes(f.read_bytes()[: e["bytes"] - 100])
    return "scores", e["rows"], e["path"]


def parquet_bit_flip(p):
    """Same size, one byte changed in the data pages: only the content hash can tell."""
    e = entry(p, "scores", "model=m1/layer=layer1")
    f = p / e["path"]
    b = bytearray(f.read_bytes())
    b[40] ^= 0xFF
    f.write_bytes(bytes(b))
    return "scores", e["rows"], e["path"]


def parquet_other_table(p):
    e = entry(p, "scores", "model=m1/layer=layer1")
    shutil.copyfile(p / entry(p, "concepts", "tables/concepts")["path"], p / e["path"])
    return "scores", e["rows"], e["path"]


def runs_file_deleted(p):
    e = entry(p, "runs", "tables/runs")
    (p / e["path"]).unlink()
    return "runs", 1, e["path"]


def stray_file(p):
    src = p / entry(p, "concepts", "tables/concepts")["path"]
    shutil.copyfile(src, p / "tables/scores/model=m1/layer=layer1/stray.parquet")


def partial_staging(p):
    d = p / "staging/20260101T000000Z-0badc0de/chunks/scores"
    d.mkdir(parents=True)
    (d / "00000.parquet").write_bytes(b"PAR1 half a chunk")
    old = time.time() - 3600
    for q in (d, d.parent, d.parent.parent):
        os.utime(q, (old, old))


def manifest_tmp_leftover(p):
    (p / f".manifest.json.{os.getpid()}.abc123.tmp").write_text('{"format": "neurostore-man')


def manifest_missing_and_parquet_truncated(p):
    """Two at once: the rebuilt manifest must not bring back the file the truncated one replaced."""
    lost = parquet_truncated(p)
    manifest_missing(p)
    return lost


def manifest_missing_and_stray_file(p):
    stray_file(p)
    manifest_missing(p)


MANIFEST_CASES = [manifest_missing, manifest_truncated, manifest_garbage, manifest_list, manifest_number,
                  manifest_generation_text, manifest_path_outside]
FILE_CASES = [parquet_deleted, parquet_truncated, parquet_bit_flip, parquet_other_table, runs_file_deleted]
LEFTOVER_CASES = [stray_file, partial_staging, manifest_tmp_leftover]
ALL_CASES = MANIFEST_CASES + [store_json_garbage, store_json_missing] + FILE_CASES + [manifest_missing_and_parquet_truncated,
                                                                 manifest_missing_and_stray_file] + LEFTOVER_CASES


@pytest.mark.parametrize("damage", ALL_CASES, ids=lambda f: f.__name__)
def test_damage_is_found_and_repair_loses_only_the_damaged_file(st, damage):
    before = row_counts(st)
    lost = damage(st) or (None, 0, None)
    report = check(st)
    if damage in LEFTOVER_CASES[1:]:  # provable garbage: clean, removed by the repair (or the next write)
        assert report["clean"] and report["garbage"], report
    else:
        assert not report["clean"] and report["problems"], report
    fixed = check(st, repair=True)
    assert fixed["repaired"], fixed
    if lost[2]:
        rows = None if damage is manifest_missing_and_parquet_truncated else lost[1]  # unknown without a manifest
        assert [(d["path"], d["rows"]) for d in fixed["dropped"]] == [(lost[2], rows)]
        assert fixed["rows_dropped"] == {lost[0]: rows or 0}
    else:
        assert fixed["dropped"] == [] and fixed["rows_dropped"] == {}
    again = check(st)
    assert again["clean"] and not again["garbage"], again
    after = row_counts(st)
    repairs = 0 if report["clean"] else 1  # a repair of damage is a run of its own, with a runs row
    for table, n in before.items():
        if table in DERIVED:
            continue  # recomputed from the scores that are left (checked below)
        assert after[table] == n - (lost[1] if table == lost[0] else 0) + (repairs if table == "runs" else 0), table
    with Store.open(st, read_only=True) as s:
        got = s.sql("SELECT params FROM runs WHERE command = 'check --repair'").column("params").to_pylist()
        assert [json.loads(p)["dropped"] for p in got] == [[lost[2]] if lost[2] else []] * repairs
        # the derived tables agree with the scores that are left: no row of a dropped score file
        assert s.sql("""SELECT count(*) n FROM concept_units c ANTI JOIN scores s
                        USING (model, layer, unit, concept, scorer)""").column("n")[0].as_py() == 0
        assert s.sql("SELECT sum(n_units) n FROM layer_concepts").column("n")[0].as_py() == \
            s.sql("SELECT count(*) n FROM scores WHERE rank = 0").column("n")[0].as_py()
    if damage is manifest_path_outside:
        assert (st.parent / "outside" / "victim.parquet").read_text() == "precious"
    # nothing of the damage is left in tables/, and the store takes writes again
    if lost[2]:
        assert not (st / lost[2]).exists()
    assert not list(st.glob(".*.tmp"))
    with Store.open(st) as s:
        s.write("concepts", concepts("after"))
    assert row_counts(st)["concepts"] == after["concepts"] + 1


@pytest.mark.parametrize("damage", MANIFEST_CASES + [store_json_garbage, store_json_missing], ids=lambda f: f.__name__)
def test_unreadable_manifest_is_refused_and_nothing_is_deleted(st, damage):
    damage(st)
    on_disk = files(st)
    with pytest.raises(StoreDamaged) as e:
        s = Store.open(st)
        s.sql("SELECT 1")
    assert "neurostore check --repair" in one_line(e.value)
    if damage in MANIFEST_CASES:
        s = Store.open(st)
        for attempt in (lambda: s.write("concepts", concepts("x")), s.gc, s.table_counts,
                        lambda: s.export(st.parent / "exp")):
            with pytest.raises(StoreDamaged, match=r"manifest\.json\b.*neurostore check --repair"):
                attempt()
        assert not (st.parent / "exp").exists()
    assert files(st) == on_disk  # the write was refused before touching anything


def test_missing_manifest_rebuild_replays_replacements(st):
    """The replaced (retired) files still on disk come back retired, not as duplicate rows."""
    man = json.loads((st / "manifest.json").read_text())
    (st / "manifest.json").unlink()
    check(st, repair=True)
    new = json.loads((st / "manifest.json").read_text())
    (repair,) = [e for e in new["tables"]["runs"] if e["path"] not in {r["path"] for r in man["tables"]["runs"]}]
    new["tables"]["runs"].remove(repair)  # the repair's own runs row
    for table in man["tables"]:
        assert sorted(e["path"] for e in new["tables"][table]) == sorted(e["path"] for e in man["tables"][table])
        for old, got in zip(*(sorted(m["tables"][table], key=lambda e: e["path"]) for m in (man, new))):
            assert {k: got[k] for k in old if k != "status"} == {k: old[k] for k in old if k != "status"}
    assert sorted(r["path"] for r in new["retired"]) == sorted(r["path"] for r in man["retired"])


def test_rebuild_after_a_repair_keeps_what_the_repair_dropped_out(st):
    """A repair's runs row records what it dropped: a manifest lost later is rebuilt without it,
    and without the file the dropped one had replaced (still on disk, retired)."""
    parquet_truncated(st)
    check(st, repair=True)
    repaired = row_counts(st)
    (st / "manifest.json").unlink()
    assert check(st, repair=True)["dropped"] == []
    assert row_counts(st) == {t: n + (t == "runs") for t, n in repaired.items()}


@pytest.mark.parametrize("runs_damage", ["truncated", "deleted"])
def test_rebuild_deletes_no_file_of_a_run_whose_runs_row_is_damaged(st, runs_damage):
    """Manifest lost and a run's runs file damaged: nothing proves its files garbage any more
    (a run with no runs row may have committed), so the repair sets them aside, never deletes them."""
    man = json.loads((st / "manifest.json").read_text())
    run_id = entry(st, "scores", "model=m1/layer=layer1")["run_id"]
    held = [e["path"] for t, es in man["tables"].items() for e in es if e["run_id"] == run_id and t != "runs"]
    runs_file = st / f"tables/runs/{run_id}.parquet"
    runs_file.write_bytes(runs_file.read_bytes()[:100]) if runs_damage == "truncated" else runs_file.unlink()
    (st / "manifest.json").unlink()
    r = check(st, repair=True)
    aside = st / r["set_aside"]
    assert len(held) > 2 and all((st / p).exists() or (aside / p).exists() for p in held)


def test_a_same_size_file_with_a_damaged_footer_fails_only_its_table(st):
    """Bytes overwritten up to the footer's end, size unchanged: the size check passes and DuckDB
    cannot bind the table's view; that failed every query of the store (even SELECT 1) with a
    traceback. Now only that table's queries fail, naming `check`, which finds the file."""
    e = entry(st, "scores", "model=m2/layer=layer1")
    f = st / e["path"]
    b = f.read_bytes()
    f.write_bytes(b[:100] + b"A" * (len(b) - 108) + b[-8:])   # keep the footer length and magic
    with Store.open(st, read_only=True) as s:
        assert s.sql("SELECT 1 AS x").column("x")[0].as_py() == 1
        assert s.sql("SELECT count(*) AS n FROM concepts").column("n")[0].as_py() > 0
        with pytest.raises(StoreDamaged, match=r"^A file of the store cannot be read \(.*\)\. Run 'neurostore check"):
            s.sql("SELECT count(*) FROM scores")
    assert e["path"] in [p["path"] for p in check(st)["problems"]]


def test_a_dropped_store_view_comes_back(st):
    """DROP VIEW through Store.sql left the session saying "Unknown table 'scores'. Did you mean scores?"."""
    with Store.open(st, read_only=True) as s:
        n = s.sql("SELECT count(*) AS n FROM scores").column("n")[0].as_py()
        s.sql("DROP VIEW scores")
        assert s.sql("SELECT count(*) AS n FROM scores").column("n")[0].as_py() == n


def test_a_view_duckdb_cannot_bind_fails_only_its_table(st, monkeypatch):
    """A damaged footer DuckDB reads when it binds a view (at connect) failed the whole connection."""
    from neurostore.store.views import Views

    view_sql = Views.view_sql
    monkeypatch.setattr(Views, "view_sql", lambda self, name, man, **kw: (
        f"SELECT * FROM read_parquet('{st}/tables/scores/no-such.parquet')" if name == "scores"
        else view_sql(self, name, man, **kw)))
    with Store.open(st, read_only=True) as s:
        assert s.sql("SELECT 1 AS x").column("x")[0].as_py() == 1
        assert s.sql("SELECT count(*) AS n FROM concepts").column("n")[0].as_py() > 0
        with pytest.raises(StoreDamaged, match=r"^Table 'scores' cannot be read: .*Run 'neurostore check"):
            s.sql("SELECT count(*) FROM scores")


# (a same-size bit flip is found only by 'neurostore check', which compares content hashes)
@pytest.mark.parametrize("damage", [c for c in FILE_CASES if c is not parquet_bit_flip], ids=lambda f: f.__name__)
def test_reads_fail_only_where_they_touch_the_damaged_file(st, damage):
    table, _, path = damage(st)
    other = "concepts" if table != "concepts" else "runs"
    with Store.open(st, read_only=True) as s:
        assert s.sql("SELECT 1 AS x").column("x")[0].as_py() == 1
        assert s.sql(f"SELECT count(*) AS n FROM {other}").column("n")[0].as_py() > 0
        with pytest.raises(StoreDamaged, match=rf"^Table '{table}' cannot be read: {path} .*neurostore check"):
            s.sql(f"SELECT count(*) FROM {table}")
        one_line(pytest.raises(StoreDamaged, s.sql, f"SELECT * FROM {table}").value)
        with pytest.raises(StoreDamaged, match=rf"Cannot export .*{path}.*Nothing was copied"):
            s.export(st.parent / "exp")
    assert not (st.parent / "exp").exists()
    on_disk = files(st)
    with Store.open(st) as s, pytest.raises(StoreDamaged, match=rf"has damaged files \({path} .*nothing was written"):
        s.write("concepts", concepts("x"))
    assert files(st) == on_disk


def test_web_snapshot_of_a_damaged_store_empties_only_the_damaged_table(st, tmp_path):
    from neurostore.guard import snapshot_database

    before = row_counts(st)
    table, _, path = parquet_deleted(st)
    with Store.open(st, read_only=True) as s:
        info = snapshot_database(s, tmp_path / "snap.duckdb")
    assert info["tables"][table] == 0 and path in info["skipped"][table]
    assert "neurostore check" in info["skipped"][table]
    other = "concepts" if table != "concepts" else "runs"
    assert info["tables"][other] == before[other]


def test_file_damaged_after_the_views_were_built(st):
    with Store.open(st, read_only=True) as s:
        assert s.sql("SELECT count(*) n FROM scores").column("n")[0].as_py() > 0
        e = entry(st, "scores", "model=m2")
        (st / e["path"]).unlink()
        with pytest.raises(StoreDamaged, match=r"cannot be read: .*neurostore check"):
            s.sql("SELECT count(*) n FROM scores")


# ---- garbage collection proves what it deletes -------------------------------------------------


def test_gc_keeps_unlisted_files_it_cannot_prove_are_garbage(st):
    stray = st / "tables/scores/model=m1/layer=layer1/mine.parquet"
    shutil.copyfile(st / entry(st, "scores", "model=m1/layer=layer1")["path"], stray)
    committed = st / entry(st, "scores", "model=m2")["path"]
    lost = committed.with_name("copy-of-committed.parquet")  # a committed run's file the manifest lost
    shutil.copyfile(committed, lost)
    os.rename(lost, committed.with_name(committed.name.replace("-0", "-9")))
    tmp = st / ".manifest.json.1.abcdef.tmp"
    tmp.write_text("{")
    with Store.open(st) as s:
        s.write("concepts", concepts("x"))
        s.gc()
    assert stray.exists() and committed.with_name(committed.name.replace("-0", "-9")).exists()
    assert not tmp.exists()  # a killed manifest write's temp file is removed by the next writer


def test_orphans_of_a_run_that_never_committed_are_collected(st):
    """A run killed after moving a file into tables/ but before its runs row (its staging folder,
    whose lock no process holds, is still there): provably garbage. The same file with no trace of
    its run in this store was copied in from elsewhere: kept (the next writer deleted it before)."""
    src = st / entry(st, "scores", "model=m2")["path"]
    for run_id, killed_here in (("20260101T000000Z-deadbeef", True), ("20260101T000000Z-c0ffee00", False)):
        orphan = src.with_name(f"{run_id}-0.parquet")
        pq.write_table(pq.read_table(src).replace_schema_metadata(
            {"neurostore": json.dumps({"run_id": run_id})}), orphan)
        if killed_here:
            (st / "staging" / run_id).mkdir(parents=True)
            (st / "staging" / run_id / ".lock").write_text("")
        garbage = {g["path"]: g["reason"] for g in check(st)["garbage"]}
        assert ("killed before its commit" in garbage[str(orphan.relative_to(st))]) if killed_here \
            else str(orphan.relative_to(st)) not in garbage
        with Store.open(st) as s:
            s.write("concepts", concepts("x"))
        assert orphan.exists() is not killed_here


def test_a_stop_during_a_commit_waits_for_it_and_says_the_run_committed(st, monkeypatch):
    """Ctrl-C between the manifest swap and the end of the commit (writing load.sql) had recorded
    the committed run as failed over its own runs file: runs unreadable, the store refused to
    writers, a repair dropping the run. Now the stop waits for the commit, which stands."""
    import signal

    from neurostore import signals
    from neurostore.store.export import Export

    write_load_sql = Export._write_load_sql

    def interrupted(self, man):
        os.kill(os.getpid(), signal.SIGINT)   # held: it stops the command once the commit is done
        write_load_sql(self, man)

    monkeypatch.setattr(Export, "_write_load_sql", interrupted)
    monkeypatch.setattr(signals, "COMMITTED_WHILE_STOPPING", [])
    monkeypatch.setattr("neurostore.store.commit.COMMITTED_WHILE_STOPPING", signals.COMMITTED_WHILE_STOPPING)
    with Store.open(st) as s, pytest.raises(KeyboardInterrupt):
        with s.run("import", {"x": 1}) as run:
            run.write("concepts", concepts("kept"))
            run_id = run.run_id
    assert signals.COMMITTED_WHILE_STOPPING == [run_id]
    assert check(st)["clean"]
    with Store.open(st, read_only=True) as s:
        assert s.sql("SELECT status FROM runs WHERE run_id = $r", {"r": run_id})["status"].to_pylist() == ["committed"]
        assert "kept" in s.sql("SELECT concept FROM concepts")["concept"].to_pylist()

    # a second stop inside the commit, after the swap, stops at once: the run still stands
    def stopped(self, man):
        raise KeyboardInterrupt

    monkeypatch.setattr(Export, "_write_load_sql", stopped)
    with Store.open(st) as s, pytest.raises(KeyboardInterrupt):
        s.write("concepts", concepts("also kept"))
    report = check(st)
    assert [p["problem"] for p in report["problems"]] == [report["problems"][0]["problem"]] \
        and "load.sql" in report["problems"][0]["path"]   # stale, and named
    with Store.open(st, read_only=True) as s:
        assert "also kept" in s.sql("SELECT concept FROM concepts")["concept"].to_pylist()
        assert set(s.sql("SELECT status FROM runs")["status"].to_pylist()) <= {"committed", "failed"}
    monkeypatch.undo()
    assert check(st, repair=True)["problems"] and check(st)["clean"]   # the repair rewrites load.sql


def test_committed_files_record_hash_and_manifest_entry(st):
    man = json.loads((st / "manifest.json").read_text())
    for table, entries in man["tables"].items():
        for e in entries:
            f = st / e["path"]
            assert e["sha256"] == _sha256(f) and e["bytes"] == f.stat().st_size
            facts = json.loads(pq.ParquetFile(f).metadata.metadata[b"neurostore"])
            assert (facts["table"], facts["partition"], facts["run_id"], facts["work_key"]) == (
                table, e["partition"], e["run_id"], e["work_key"])


def test_entries_without_hash_are_checked_by_footer(st):
    """A manifest written before hashes were recorded: size, footer and row count are checked."""
    man = json.loads((st / "manifest.json").read_text())
    for entries in man["tables"].values():
        for e in entries:
            e.pop("sha256")
    (st / "manifest.json").write_text(json.dumps(man))
    assert check(st)["clean"]
    e = entry(st, "concepts", "tables/concepts")
    f = st / e["path"]
    f.write_bytes(b"\0" * e["bytes"])  # same size, no footer
    (problem,) = check(st)["problems"]
    assert problem["path"] == e["path"] and problem["problem"].startswith("corrupt: unreadable Parquet footer")


# ---- the command --------------------------------------------------------------------------------


def test_cli_check_exit_codes_json_and_one_line_errors(st, capsys, monkeypatch):
    code, out, _ = run_cli(capsys, monkeypatch, "check", "--store", st, "--json")
    assert code == 0 and json.loads(out)["clean"] is True
    (st / "manifest.json").unlink()
    code, out, err = run_cli(capsys, monkeypatch, "tables", "--store", st)
    assert code == 1 and err.startswith(f"Error: Store '{st}' has no manifest.json") and err.count("\n") == 1
    assert out == ""
    code, out, _ = run_cli(capsys, monkeypatch, "check", "--store", st)
    assert code == 1 and "manifest.json: " in out and "check --repair" in out
    code, out, _ = run_cli(capsys, monkeypatch, "check", "--repair", "--store", st, "--json")
    r = json.loads(out)
    assert code == 0 and r["repaired"] and r["dropped"] == []
    assert r["manifest"].startswith(f"Store '{st}' has no manifest.json")
    assert run_cli(capsys, monkeypatch, "check", "--store", st)[0] == 0


@pytest.mark.parametrize("text", [b"", b'{"format": "neuro', b"\x89PNG\r\n", b"[]"],
                         ids=["empty", "truncated", "binary", "list"])
def test_cli_store_json_damage_is_one_line(st, text, capsys, monkeypatch):
    (st / "store.json").write_bytes(text)
    code, _, err = run_cli(capsys, monkeypatch, "sql", "SELECT 1", "--store", st)
    assert code == 1 and err.count("\n") == 1 and "check --repair" in err
    assert err.startswith(f"Error: Store '{st}': store.json ")
    assert run_cli(capsys, monkeypatch, "check", "--repair", "--store", st)[0] == 0
    assert run_cli(capsys, monkeypatch, "sql", "SELECT count(*) FROM scores", "--store", st)[0] == 0


def test_real_dissect_store_survives_a_lost_manifest_and_a_damaged_file(demo_run, tmp_path):
    """A copy of the session's demo store (probe-world CNN and ViT dissected with every scorer):
    manifest deleted and the largest scores file truncated; the rebuild keeps every other row."""
    path = tmp_path / "st"
    shutil.copytree(demo_run[1].path, path)
    before = row_counts(path)
    man = json.loads((path / "manifest.json").read_text())
    big = max(man["tables"]["scores"], key=lambda e: e["bytes"])
    (path / big["path"]).write_bytes((path / big["path"]).read_bytes()[: big["bytes"] // 2])
    (path / "manifest.json").unlink()
    r = check(path, repair=True)
    assert r["repaired"] and [d["path"] for d in r["dropped"]] == [big["path"]]
    after = row_counts(path)
    assert {t: n for t, n in after.items() if t not in DERIVED} == {
        t: n - (big["rows"] if t == "scores" else 0) + (t == "runs") for t, n in before.items() if t not in DERIVED}
    assert check(path)["clean"]


def tally(root: Path) -> dict:
    """Every damage case on a fresh copy of the small store, repaired: rows per table before the
    damage and after the repair. `python tests/test_store_damage.py` prints it as one JSON line."""
    template = build_store(root / "template")
    total = row_counts(template)
    out = {"cases": 0, "store_rows": sum(n for t, n in total.items() if t not in DERIVED),
           "store_files": len(list((template / "tables").rglob("*.parquet"))),
           "damaged_file_rows_dropped": 0, "intact_rows_lost": 0, "per_case": {}}
    for damage in ALL_CASES:
        path = root / damage.__name__
        shutil.copytree(template, path)
        table, rows, _ = damage(path) or (None, 0, None)
        found = not check(path)["clean"] or bool(check(path)["garbage"])
        repairs = int(not check(path)["clean"])  # a repair of damage adds its own runs row
        check(path, repair=True)
        after = row_counts(path)
        lost = sum(total[t] - after[t] - (rows if t == table else 0) + (repairs if t == "runs" else 0)
                   for t in total if t not in DERIVED)
        out["cases"] += 1
        out["damaged_file_rows_dropped"] += rows
        out["intact_rows_lost"] += lost
        out["per_case"][damage.__name__] = {"found": found, "damaged_rows": rows, "intact_rows_lost": lost}
    return out


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(tally(Path(tmp))))

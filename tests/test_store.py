"""The store on real DuckDB and Parquet in temp folders: commit, crash, re-run, schema checks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from neurostore.store import derived, files, maintenance
from neurostore.errors import BadInput, SchemaMismatch, StoreNotFound, StoreVersionError, UnknownTable
from neurostore.store import Store

REPO = Path(__file__).resolve().parent.parent


def scores_table(model="m1", layer="layer1", n_units=10, k=5, seed=0, concepts=13):
    rng = np.random.default_rng(seed)
    unit = np.repeat(np.arange(n_units), k)
    rank = np.tile(np.arange(k), n_units)
    score = np.sort(rng.random((n_units, k)), axis=1)[:, ::-1].ravel()
    return pa.table({
        "unit": unit, "scorer": ["patch"] * len(unit), "rank": rank,
        "concept": [f"c{(u * 7 + r) % concepts}" for u, r in zip(unit, rank)],
        "score": score, "confidence": score, "vocabulary": ["v"] * len(unit), "encoder": ["enc"] * len(unit),
        "model": [model] * len(unit), "layer": [layer] * len(unit),
    })


def count(store, table="scores") -> int:
    return store.sql(f"SELECT count(*) AS n FROM {table}").column("n")[0].as_py()


# ---- opening --------------------------------------------------------------------------------


def test_missing_store_read_only_is_not_created(tmp_path):
    with pytest.raises(StoreNotFound, match=r"No neurostore store at '.*nope'\. Create one with"):
        Store.open(tmp_path / "nope", read_only=True)
    assert not (tmp_path / "nope").exists()
    (tmp_path / "afile").write_text("x")   # a file: said so, not 'create one with neurostore demo --store afile'
    for ro in (True, False):
        with pytest.raises(BadInput, match=r"'.*afile' is a file, not a store folder"):
            Store.open(tmp_path / "afile", read_only=ro)


def test_create_layout_and_version(tmp_path):
    s = Store.open(tmp_path / "st")
    info = json.loads((tmp_path / "st/store.json").read_text())
    assert info["format"] == "neurostore" and info["schema_version"] == int((REPO / "schema/version.txt").read_text())
    assert (tmp_path / "st/manifest.json").exists() and (tmp_path / "st/tables").is_dir()
    # every table exists as an empty view with the DDL's columns
    assert set(s.tables()) >= {"runs", "scores", "concept_units", "embeddings"}
    got = s.sql("SELECT * FROM scores")
    assert got.num_rows == 0 and got.column_names == [c for c, _, _ in s.schema("scores")]
    s.close()


def test_newer_store_version_is_refused(tmp_path):
    Store.open(tmp_path / "st").close()
    p = tmp_path / "st/store.json"
    info = json.loads(p.read_text())
    info["schema_version"] += 1
    p.write_text(json.dumps(info))
    with pytest.raises(StoreVersionError, match=r"schema version \d+.*Upgrade neurostore"):
        Store.open(tmp_path / "st")


def test_non_store_folder_is_refused(tmp_path):
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff/file.txt").write_text("x")
    with pytest.raises(BadInput, match="is not a neurostore store"):
        Store.open(tmp_path / "stuff")


def test_read_only_store_refuses_writes(tmp_path):
    Store.open(tmp_path / "st").close()
    ro = Store.open(tmp_path / "st", read_only=True)
    with pytest.raises(BadInput, match="read-only"):
        ro.run("x")


# ---- writing and reading ----------------------------------------------------------------------


def test_write_read_layout_and_plain_readers(store):
    with store.run("test", {"a": 1}) as run:
        assert run.write("scores", scores_table("m1", "layer1", 10)) == 50
        run.write("scores", scores_table("m1", "layer2.0.conv", 8).to_pandas())  # pandas works too
    assert count(store) == 90
    ids = store.sql("SELECT DISTINCT run_id FROM scores").column("run_id").to_pylist()
    assert ids == [run.run_id]
    # Hive layout: model/layer are directories, not file columns
    files = sorted((store.path / "tables/scores").rglob("*.parquet"))
    assert [f.parent.relative_to(store.path / "tables/scores").as_posix() for f in files] == [
        "model=m1/layer=layer1", "model=m1/layer=layer2.0.conv"]
    assert "model" not in pq.read_schema(files[0]).names
    # plain pyarrow reads the folder with partitions restored
    t = ds.dataset(store.path / "tables/scores", partitioning="hive", format="parquet").to_table()
    assert t.num_rows == 90 and set(t.column("layer").to_pylist()) == {"layer1", "layer2.0.conv"}
    # plain duckdb through load.sql, run from the store folder
    con = duckdb.connect()
    cwd = os.getcwd()
    try:
        os.chdir(store.path)
        con.execute((store.path / "load.sql").read_text())
        assert con.execute("SELECT count(*) FROM scores").fetchone()[0] == 90
        assert con.execute("SELECT count(*) FROM runs").fetchone()[0] == 1
    finally:
        os.chdir(cwd)
        con.close()
    # runs row: provenance
    r = store.runs().to_pylist()[0]
    assert r["command"] == "test" and r["status"] == "committed" and json.loads(r["params"]) == {"a": 1}
    assert json.loads(r["tables"]) == {"scores": 90} and "duckdb" in json.loads(r["versions"])
    assert r["ended_at"] >= r["started_at"] and r["host"]
    assert store.df("SELECT * FROM scores LIMIT 3").shape == (3, 11)


def test_writer_sorts_and_uses_point_lookup_row_groups(store, monkeypatch):
    monkeypatch.setitem(files.ROW_GROUP_ROWS, "scores", 4096)
    t = scores_table(n_units=3000, k=5)
    shuffled = t.take(np.random.default_rng(1).permutation(t.num_rows))
    with store.run("sorted") as run:
        run.write("scores", shuffled.slice(0, 7000))
        run.write("scores", shuffled.slice(7000))  # two chunks, merged into one sorted file
    (f,) = list((store.path / "tables/scores").rglob("*.parquet"))
    meta = pq.ParquetFile(f).metadata
    assert meta.num_rows == 15000 and meta.num_row_groups >= 2
    assert max(meta.row_group(i).num_rows for i in range(meta.num_row_groups)) <= 4096
    back = pq.read_table(f)
    keys = list(zip(back.column("unit").to_pylist(), back.column("rank").to_pylist()))
    assert keys == sorted(keys)


def test_a_sorted_chunk_is_sealed_as_written_and_reads_like_a_sorted_one(store, monkeypatch):
    """A slot's one chunk already in the table's order is written as its sealed file (sealing
    moves it: no re-read, sort or recompression); a second chunk, or an unsorted one, goes through
    DuckDB's sort. Both read back alike: same rows, same order, same footer facts, row groups."""
    from neurostore.store.commit import _is_sorted

    monkeypatch.setitem(files.ROW_GROUP_ROWS, "scores", 4096)
    t = scores_table(n_units=3000, k=5)              # sorted by unit, scorer, rank
    assert _is_sorted(t, ["unit", "scorer", "rank"]) and not _is_sorted(t, ["rank"])
    shuffled = t.take(np.random.default_rng(1).permutation(t.num_rows))
    backs = {}
    for name, parts in (("sorted", [t]), ("shuffled", [shuffled]), ("sorted+more", [t.slice(0, 7000), t.slice(7000)])):
        with store.run(name, {"model": name}) as run:
            for p in parts:
                run.write("scores", p.set_column(t.schema.get_field_index("model"), "model", pa.array([name.replace("+", "-")] * p.num_rows)))
        (f,) = list((store.path / "tables/scores").glob(f"model={name.replace('+', '-')}/**/*.parquet"))
        pf = pq.ParquetFile(f)
        facts = files._file_facts(f)
        assert facts["table"] == "scores" and facts["run_id"] == run.run_id and facts["partition"]["model"] == name.replace("+", "-")
        assert max(pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)) <= 4096
        # the sorted chunk is the file (Arrow wrote it); the others were sorted by DuckDB
        assert pf.metadata.created_by.startswith("parquet-cpp") == (name == "sorted"), pf.metadata.created_by
        backs[name] = pf.read().drop_columns(["run_id"])
    assert backs["sorted"].to_pylist() == backs["shuffled"].to_pylist()
    assert backs["sorted"].to_pylist() == backs["sorted+more"].to_pylist()
    assert count(store) == 45000 and store.sql("SELECT count(*) AS n FROM scores WHERE model = 'sorted' AND unit = 7")["n"][0].as_py() == 5


def test_uncommitted_rows_are_invisible_until_commit(store):
    run = store.run("slow")
    run.write("scores", scores_table())
    assert count(store) == 0
    run.commit()
    assert count(store) == 50


def test_exception_discards_rows_and_records_failed_run(store):
    with pytest.raises(RuntimeError):
        with store.run("boom", {"x": 1}) as run:
            run.write("scores", scores_table())
            raise RuntimeError("disk on fire")
    assert count(store) == 0
    r = store.runs().to_pylist()
    assert [(x["status"], x["error"]) for x in r] == [("failed", "RuntimeError: disk on fire")]
    assert not list((store.path / "staging").iterdir())
    assert not list((store.path / "tables/scores").rglob("*.parquet")) if (store.path / "tables/scores").exists() else True


def test_rerun_replaces_and_other_work_appends(store):
    for _ in range(3):
        with store.run("dissect", {"model": "m1"}) as run:
            run.write("scores", scores_table("m1", "layer1", 10))
            run.write("scores", scores_table("m1", "layer2", 4))
    assert count(store) == 70
    with store.run("dissect", {"model": "m2"}) as run:
        run.write("scores", scores_table("m2", "layer1", 10))
    assert count(store) == 120
    assert store.sql("SELECT count(DISTINCT run_id) n FROM scores").column("n")[0].as_py() == 2
    assert count(store, "runs") == 4
    # one-shot writes are keyed by content
    store.write("concepts", {"vocabulary": ["v", "v"], "concept": ["a", "b"], "category": [None, None]})
    store.write("concepts", {"vocabulary": ["v", "v"], "concept": ["a", "b"], "category": [None, None]})
    store.write("concepts", {"vocabulary": ["w"], "concept": ["c"], "category": ["x"]})
    assert count(store, "concepts") == 3


def test_replaced_files_are_deleted_after_grace(store, monkeypatch):
    with store.run("dissect", {"model": "m1"}) as run:
        run.write("scores", scores_table())
    old = {e["path"] for e in store.manifest()["tables"]["scores"]}
    with store.run("dissect", {"model": "m1"}) as run:
        run.write("scores", scores_table())
    man = store.manifest()
    assert {r["path"] for r in man["retired"]} >= old and all((store.path / p).exists() for p in old)
    monkeypatch.setattr(maintenance, "GRACE_SECONDS", 0.0)
    store.gc()
    assert not any((store.path / p).exists() for p in old)
    assert count(store) == 50


def test_concept_units_derived_from_scores(store, monkeypatch):
    monkeypatch.setattr(derived, "CONCEPT_UNITS_TOP", 6)
    with store.run("a") as run:
        run.write("scores", scores_table("m1", "layer1", 30, seed=1))
        run.write("scores", scores_table("m1", "layer2", 30, seed=2))
    brute = store.sql("""
        SELECT concept, layer, unit, score FROM scores WHERE model = 'm1' AND concept = 'c3'
        ORDER BY score DESC, layer, unit""").to_pylist()
    got = store.sql("SELECT concept, layer, unit, score, rank FROM concept_units WHERE concept = 'c3' ORDER BY rank").to_pylist()
    assert [(g["layer"], g["unit"]) for g in got] == [(b["layer"], b["unit"]) for b in brute][:derived.CONCEPT_UNITS_TOP]
    assert [g["rank"] for g in got] == list(range(len(got)))
    # only the best CONCEPT_UNITS_TOP units per (model, concept, scorer) are kept
    assert store.sql("SELECT max(n) m FROM (SELECT count(*) n FROM concept_units GROUP BY model, concept, scorer)"
                     ).column("m")[0].as_py() <= derived.CONCEPT_UNITS_TOP
    with pytest.raises(BadInput, match="derived by the store from scores"):
        with store.run("x") as run:
            run.write("concept_units", {"concept": ["a"]})


# ---- validation --------------------------------------------------------------------------------


def test_schema_mismatch_names_table_and_column(store):
    t = scores_table()
    with store.run("v") as run:
        with pytest.raises(SchemaMismatch, match=r"^Table 'scores' is missing column 'concept' \(VARCHAR"):
            run.write("scores", t.drop_columns(["concept"]))
        with pytest.raises(SchemaMismatch, match=r"^Table 'scores' has no column 'scroe'\. Did you mean score, "):
            run.write("scores", t.append_column("scroe", t.column("score")))
        with pytest.raises(SchemaMismatch, match=r"^Table 'scores', column 'unit': expected INTEGER, got Arrow type string"):
            run.write("scores", t.set_column(0, "unit", pa.array([str(x) for x in t.column("unit").to_pylist()])))
        with pytest.raises(SchemaMismatch, match=r"^Table 'scores', column 'unit': values do not fit INTEGER"):
            run.write("scores", t.set_column(0, "unit", pa.array([2**40] * t.num_rows, pa.int64())))
        with pytest.raises(SchemaMismatch, match=r"column 'model': 'ResNet 50' is not a valid model"):
            run.write("scores", t.set_column(t.schema.get_field_index("model"), "model", pa.array(["ResNet 50"] * t.num_rows)))
        with pytest.raises(SchemaMismatch, match=r"column 'layer': '../x' is not a valid layer"):
            run.write("scores", t.set_column(t.schema.get_field_index("layer"), "layer", pa.array(["../x"] * t.num_rows)))
        with pytest.raises(UnknownTable, match=r"^Unknown table 'score'\. Did you mean scores"):
            run.write("score", t)
        # safe widenings: int64 -> INTEGER when the values fit, float64 -> FLOAT
        assert t.schema.field("unit").type == pa.int64() and t.schema.field("score").type == pa.float64()
        assert run.write("scores", t) == 50
    assert store.sql("SELECT typeof(unit) u, typeof(score) s FROM scores LIMIT 1").to_pylist() == [
        {"u": "INTEGER", "s": "FLOAT"}]


def test_list_json_timestamp_and_blob_columns(store):
    with store.run("types") as run:
        run.write("embeddings", {"encoder": ["e"], "kind": ["concept"], "item_id": ["x"],
                                 "vector": pa.array([np.arange(4, dtype=np.float64)], pa.list_(pa.float64()))})
        run.write("patches", {"patch_id": ["p"], "dataset": ["d"], "image_id": ["i"], "x0": [0], "y0": [0],
                              "x1": [4], "y1": [4], "thumbnail": [b"\x89PNG"]})
    got = store.sql("SELECT vector, typeof(vector) t FROM embeddings").to_pylist()[0]
    assert got["t"] == "FLOAT[]" and got["vector"] == [0.0, 1.0, 2.0, 3.0]
    assert store.sql("SELECT thumbnail FROM patches").to_pylist()[0]["thumbnail"] == b"\x89PNG"
    assert store.sql("SELECT typeof(params) t, typeof(started_at) s FROM runs").to_pylist()[0] == {
        "t": "JSON", "s": "TIMESTAMP"}


# ---- crashes and concurrency ------------------------------------------------------------------

WRITER = textwrap.dedent("""
    import sys, time, numpy as np, pyarrow as pa
    sys.path.insert(0, {tests!r})
    from test_store import scores_table
    from neurostore.store import Store
    s = Store.open({path!r})
    with s.run("dissect", {{"model": "m1"}}) as run:
        for i in range(4):
            run.write("scores", scores_table("m1", f"layer{{i}}", 25))
        {extra}
""")


def _spawn(path, extra):
    code = WRITER.format(tests=str(Path(__file__).parent), path=str(path), extra=extra)
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_mid_run_leaves_nothing_and_rerun_is_exact(tmp_path):
    path = tmp_path / "st"
    Store.open(path).close()
    p = _spawn(path, 'print("READY", flush=True); time.sleep(120)')
    assert p.stdout.readline().strip() == "READY", p.stderr.read()
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=10)
    assert p.returncode == -signal.SIGKILL
    dead = list((path / "staging").iterdir())
    assert len(dead) == 1  # the killed run's staged files are still on disk, but not visible
    s = Store.open(path)
    assert count(s) == 0 and count(s, "runs") == 0
    # a re-run completes with exact counts, and cleans the dead run's staging folder
    with s.run("dissect", {"model": "m1"}) as run:
        for i in range(4):
            run.write("scores", scores_table("m1", f"layer{i}", 25))
    assert count(s) == 500 and count(s, "runs") == 1
    assert not (path / "staging" / dead[0].name).exists()
    s.close()


def test_sigkill_inside_commit_before_manifest_swap(tmp_path):
    """Worst moment: files already moved into tables/, manifest not yet replaced."""
    path = tmp_path / "st"
    s = Store.open(path)
    with s.run("earlier") as run:
        run.write("scores", scores_table("m0", "layer0", 10))
    extra = textwrap.dedent("""
        import os, signal
        from neurostore.store import commit as sm  # the module whose commit writes the manifest
        real = sm._atomic_write
        def killer(p, text):
            if p.name == "manifest.json":
                os.kill(os.getpid(), signal.SIGKILL)
            real(p, text)
        sm._atomic_write = killer
    """).replace("\n", "\n        ")
    p = _spawn(path, extra)
    p.wait(timeout=60)
    assert p.returncode == -signal.SIGKILL, p.stderr.read()
    assert len(list((path / "tables/scores/model=m1").rglob("*.parquet"))) == 4  # orphans on disk
    assert count(s) == 50 and count(s, "runs") == 1  # ... but invisible
    with s.run("dissect", {"model": "m1"}) as run:
        for i in range(4):
            run.write("scores", scores_table("m1", f"layer{i}", 25))
    assert count(s) == 550
    assert len(list((path / "tables/scores/model=m1").rglob("*.parquet"))) == 4  # orphans collected
    s.close()


def test_reader_never_sees_half_a_run(tmp_path):
    path = tmp_path / "st"
    writer = Store.open(path)
    per_run = 4 * 50  # each run writes 4 partitions of 50 rows
    seen, errors, stop = [], [], threading.Event()

    def read_loop():
        reader = Store.open(path, read_only=True)
        try:
            while not stop.is_set():
                seen.append(count(reader))
        except Exception as e:  # any error fails the test
            errors.append(e)
        finally:
            reader.close()

    t = threading.Thread(target=read_loop)
    t.start()
    try:
        for i in range(6):
            # runs 0..3 are new work; 4 and 5 re-run earlier work (replacement while reading)
            with writer.run("dissect", {"model": f"m{i % 4}"}) as run:
                for layer in range(4):
                    run.write("scores", scores_table(f"m{i % 4}", f"layer{layer}", 10))
            time.sleep(0.05)
    finally:
        time.sleep(0.2)
        stop.set()
        t.join(timeout=30)
    assert not errors, errors
    assert len(seen) > 10
    assert all(n % per_run == 0 for n in seen), sorted(set(seen))
    assert seen[-1] == 4 * per_run and count(writer) == 4 * per_run
    writer.close()


# ---- export ------------------------------------------------------------------------------------


def test_export_is_plain_parquet_with_load_sql(store, tmp_path):
    with store.run("a") as run:
        run.write("scores", scores_table("m1", "layer1", 10))
        run.write("concepts", {"vocabulary": ["v"], "concept": ["red"], "category": ["colour"]})
    out = store.export(tmp_path / "exp")
    assert out["tables"]["scores"] == 50 and out["tables"]["concepts"] == 1 and out["tables"]["runs"] == 1
    assert (tmp_path / "exp/schema/scores.sql").exists()
    con = duckdb.connect()
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path / "exp")
        con.execute((tmp_path / "exp/load.sql").read_text())
        assert con.execute("SELECT count(*) FROM scores").fetchone()[0] == 50
        assert con.execute("SELECT count(*) FROM concept_units").fetchone()[0] == store.table_counts()["concept_units"]
        assert con.execute("SELECT count(*) FROM images").fetchone()[0] == 0
        # the macros plain DuckDB can run come with it (similar_concepts needs neurostore's MiniLM)
        assert con.execute("SELECT count(*) FROM concept_neurons('red')").fetchone()[0] >= 0
        assert con.execute("SELECT count(*) FROM neuron_concepts('m1', 'layer1', 0)").fetchone()[0] == 5
        assert "not: similar_concepts" in (tmp_path / "exp/load.sql").read_text()
    finally:
        os.chdir(cwd)
        con.close()
    with pytest.raises(BadInput, match="is not empty"):
        store.export(tmp_path / "exp")
    # the export is the user's to edit: rewriting its files in place leaves the store intact
    for f in (tmp_path / "exp" / "tables").rglob("*.parquet"):
        f.write_bytes(b"edited")
    assert store.table_counts()["scores"] == 50 and not store.damaged_files(
        e for entries in store.manifest()["tables"].values() for e in entries)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(BadInput, match="is a file"):
        store.export(tmp_path / "afile")
    # overwrite=True replaces an earlier export only: it deleted another store's tables/ (its
    # committed files gone for good), and would have any folder's 'tables'
    assert store.export(tmp_path / "exp", overwrite=True)["tables"]["scores"] == 50
    other = Store.open(tmp_path / "other")
    other.write("concepts", {"vocabulary": ["v"], "concept": ["blue"], "category": [None]})
    mine = tmp_path / "mine"
    (mine / "tables").mkdir(parents=True)
    (mine / "tables" / "notes.txt").write_text("keep me")
    for target, why in ((other.path, "is a neurostore store; an export never replaces one"),
                        (mine, r"holds other files and no earlier export \(no load.sql\)")):
        with pytest.raises(BadInput, match=why):
            store.export(target, overwrite=True)
    assert other.check()["clean"] and other.table_counts()["concepts"] == 1
    assert (mine / "tables" / "notes.txt").read_text() == "keep me"


def test_run_records_when_the_work_began(tmp_path):
    """A dissect computes for minutes and opens its run only to write: the runs row must say when
    the work began, not when the commit started (it recorded 1.28 s for a 1,141 s dissect)."""
    import time

    from neurostore.store import Store

    store = Store.open(tmp_path / "s")
    with store.run("slow work", {"n": 1}, started_at=time.time() - 600):
        pass
    with store.run("quick work", {"n": 2}):
        pass
    got = {r["command"]: r["seconds"] for r in store.sql(
        "SELECT command, epoch(ended_at) - epoch(started_at) AS seconds FROM runs").to_pylist()}
    assert 600 <= got["slow work"] < 660
    assert got["quick work"] < 60


def test_a_store_reading_through_a_function_sends_every_query_there(tmp_path):
    """The web app serves API functions written against Store from its snapshot this way."""
    import pyarrow as pa

    asked = []

    def reader(sql, params):
        asked.append((sql, params))
        return pa.table({"x": [1]})

    st = Store.reading_through(tmp_path / "nowhere", reader)
    assert st.read_only and st.sql("SELECT x FROM t", {"a": 1}).to_pylist() == [{"x": 1}]
    assert st.df("SELECT 2")["x"].tolist() == [1]
    assert asked == [("SELECT x FROM t", {"a": 1}), ("SELECT 2", None)]
    assert not (tmp_path / "nowhere").exists()  # nothing opened or created

"""layer_concepts, derived by the store from scores at commit: it always equals a GROUP BY over the
committed scores (commits, re-runs, replaced partitions, failed runs, stores written before it
existed), and cannot be written directly."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_store import scores_table  # noqa: E402

from neurostore.errors import BadInput  # noqa: E402
from neurostore.store import Store  # noqa: E402

DIRECT = """
    SELECT model, layer, scorer, concept, count(*) AS n_units, avg(confidence) AS mean_confidence
    FROM scores WHERE rank = 0 {where}
    GROUP BY model, layer, scorer, concept
    ORDER BY model, layer, scorer, n_units DESC, concept"""


def scores(model, layer, n_units, seed, concepts=13, scorer="patch"):
    t = scores_table(model, layer, n_units, seed=seed, concepts=concepts)
    return t.set_column(t.schema.get_field_index("scorer"), "scorer", pa.array([scorer] * t.num_rows))


def assert_matches_scores(store: Store) -> list[dict]:
    """layer_concept_counts() and layer_concepts equal a direct GROUP BY over scores."""
    direct = store.sql(DIRECT.format(where="")).to_pylist()
    got = store.sql("SELECT * FROM layer_concept_counts()").to_pylist()
    assert got == [{k: r[k] for k in ("model", "layer", "scorer", "concept", "n_units")} for r in direct]
    derived = store.sql("""SELECT model, layer, scorer, concept, n_units, mean_confidence FROM layer_concepts
                           ORDER BY model, layer, scorer, n_units DESC, concept""").to_pylist()
    assert [r["mean_confidence"] for r in derived] == pytest.approx([r["mean_confidence"] for r in direct], rel=1e-6)
    # the macro's filters give the filtered GROUP BY
    for model, scorer in (("m1", None), ("m2", "wpmi"), ("m1", "patch")):
        where = f"AND model = '{model}'" + (f" AND scorer = '{scorer}'" if scorer else "")
        want = [(r["layer"], r["scorer"], r["concept"], r["n_units"])
                for r in store.sql(DIRECT.format(where=where)).to_pylist()]
        sub = store.sql("SELECT * FROM layer_concept_counts(model_id := $m, scorer_name := $s)",
                        {"m": model, "s": scorer}).to_pylist()
        assert [(r["layer"], r["scorer"], r["concept"], r["n_units"]) for r in sub] == want
    return got


def test_layer_concepts_follow_commits_reruns_and_replacements(tmp_path):
    store = Store.open(tmp_path / "st")
    with store.run("dissect", {"model": "m1"}) as run:
        run.write("scores", scores("m1", "layer1", 30, seed=1))
        run.write("scores", scores("m1", "layer2", 25, seed=2))
    first = assert_matches_scores(store)
    assert sum(r["n_units"] for r in first if r["layer"] == "layer1") == 30
    assert store.describe("layer_concepts")["derived"] is True

    # another model and another scorer in a second commit: m1's rows are untouched
    with store.run("dissect", {"model": "m2"}) as run:
        run.write("scores", scores("m2", "layer1", 20, seed=3, concepts=5))
        run.write("scores", scores("m2", "layer1", 20, seed=4, concepts=5, scorer="wpmi"), key="wpmi")
    got = assert_matches_scores(store)
    assert [r for r in got if r["model"] == "m1"] == first
    m1_files = [e["path"] for e in store.manifest()["tables"]["layer_concepts"] if e["partition"]["model"] == "m1"]

    # re-running the same work replaces its scores: counts stay the same, nothing doubles
    with store.run("dissect", {"model": "m2"}) as run:
        run.write("scores", scores("m2", "layer1", 20, seed=3, concepts=5))
        run.write("scores", scores("m2", "layer1", 20, seed=4, concepts=5, scorer="wpmi"), key="wpmi")
    assert assert_matches_scores(store) == got
    # only the touched model was derived again
    assert [e["path"] for e in store.manifest()["tables"]["layer_concepts"]
            if e["partition"]["model"] == "m1"] == m1_files

    # other work on the same partition adds rank-0 rows; the counts add up
    with store.run("dissect", {"model": "m1", "images": "more"}) as run:
        run.write("scores", scores("m1", "layer1", 10, seed=5))
    got = assert_matches_scores(store)
    assert sum(r["n_units"] for r in got if r["model"] == "m1" and r["layer"] == "layer1") == 40

    # a run replacing the partition drops every earlier file of it, and the counts with them
    with store.run("dissect", {"model": "m1", "v": 2}, replace="partition") as run:
        run.write("scores", scores("m1", "layer1", 7, seed=6, concepts=3))
    got = assert_matches_scores(store)
    assert sum(r["n_units"] for r in got if r["model"] == "m1" and r["layer"] == "layer1") == 7
    assert {r["concept"] for r in got if r["model"] == "m1" and r["layer"] == "layer1"} <= {"c0", "c1", "c2"}

    # a failed run changes nothing
    with pytest.raises(RuntimeError):
        with store.run("dissect", {"model": "m1", "v": 3}) as run:
            run.write("scores", scores("m1", "layer2", 50, seed=7))
            raise RuntimeError("boom")
    assert assert_matches_scores(store) == got
    # one file per model, rows as the manifest says, a NULL concept or confidence nowhere here
    entries = store.manifest()["tables"]["layer_concepts"]
    assert sorted(e["partition"]["model"] for e in entries) == ["m1", "m2"]
    assert sum(e["rows"] for e in entries) == len(got) == store.table_counts()["layer_concepts"]
    store.close()


def test_rank0_rows_with_null_concept_count_like_group_by(tmp_path):
    store = Store.open(tmp_path / "st")
    t = scores("m1", "layer1", 12, seed=1)
    concept = pc.if_else(pc.equal(t.column("unit"), 3), pa.scalar(None, pa.string()), t.column("concept"))
    t = t.set_column(t.schema.get_field_index("concept"), "concept", concept)
    store.write("scores", t)
    got = assert_matches_scores(store)
    assert [r["n_units"] for r in got if r["concept"] is None] == [1]
    store.close()


def test_writing_layer_concepts_is_refused(tmp_path):
    store = Store.open(tmp_path / "st")
    row = {"layer": ["layer1"], "scorer": ["patch"], "concept": ["c1"], "n_units": [3], "mean_confidence": [0.5],
           "model": ["m1"]}
    with pytest.raises(BadInput, match="'layer_concepts' is derived by the store from scores at commit; write scores"):
        with store.run("x") as run:
            run.write("layer_concepts", row)
    with pytest.raises(BadInput, match="layer_concepts"):
        store.write("layer_concepts", row)
    assert store.table_counts()["layer_concepts"] == 0
    assert store.sql("SELECT status FROM runs").column("status").to_pylist() == ["failed", "failed"]
    store.close()


def test_store_written_before_layer_concepts_existed(tmp_path, monkeypatch):
    """A manifest without layer_concepts (an older store): the view derives the missing models'
    rows from their scores, load.sql too, and the next commit of the model writes the table."""
    path = tmp_path / "st"
    store = Store.open(path)
    store.write("scores", scores("m1", "layer1", 15, seed=1))
    store.write("scores", scores("m2", "layer1", 9, seed=2, scorer="wpmi"))
    store.close()
    man = json.loads((path / "manifest.json").read_text())
    for e in man["tables"].pop("layer_concepts"):
        (path / e["path"]).unlink()
    (path / "manifest.json").write_text(json.dumps(man))

    old = Store.open(path, read_only=True)
    assert old.table_counts()["layer_concepts"] == 0
    before = assert_matches_scores(old)
    assert {r["model"] for r in before} == {"m1", "m2"}
    assert old.sql("SELECT count(*) n FROM layer_concepts WHERE run_id IS NULL").column("n")[0].as_py() == len(before)
    old.close()

    # a new commit of m1 derives m1's table; m2 is still computed in the view
    store = Store.open(path)
    with store.run("dissect", {"model": "m1"}) as run:
        run.write("scores", scores("m1", "layer2", 6, seed=3))
    assert [e["partition"]["model"] for e in store.manifest()["tables"]["layer_concepts"]] == ["m1"]
    after = assert_matches_scores(store)
    assert [r for r in after if r["model"] == "m2"] == [r for r in before if r["model"] == "m2"]

    # plain DuckDB with load.sql sees the same rows (relative paths, both file-backed and derived)
    monkeypatch.chdir(path)
    con = duckdb.connect()
    con.execute((path / "load.sql").read_text())
    plain = con.execute("SELECT model, layer, scorer, concept, n_units FROM layer_concepts "
                        "ORDER BY model, layer, scorer, n_units DESC, concept").fetchall()
    con.close()
    assert plain == [tuple(r.values()) for r in after]
    store.close()


def test_layer_concepts_files_are_in_the_macros_order(tmp_path):
    """Each model's file is written in layer_concept_counts' order (the schema's `-- sort:` with
    DESC), so the macro's ORDER BY sorts presorted rows."""
    def skewed(t):  # the last concept by name is the most frequent best concept
        best = pc.and_(pc.equal(t.column("rank"), 0), pc.not_equal(pc.bit_wise_and(t.column("unit"), 1), 0))
        return t.set_column(t.schema.get_field_index("concept"), "concept",
                            pc.if_else(best, pa.scalar("c9"), t.column("concept")))

    store = Store.open(tmp_path / "st")
    with store.run("dissect", {"model": "m1"}) as run:
        run.write("scores", skewed(scores("m1", "layer2", 40, seed=1, concepts=6)))
        run.write("scores", skewed(scores("m1", "layer1", 40, seed=2, concepts=6)))
        run.write("scores", skewed(scores("m1", "layer1", 40, seed=3, concepts=6, scorer="wpmi")), key="wpmi")
    assert store.schemas["layer_concepts"].sort == ("layer", "scorer", "n_units DESC", "concept")
    (entry,) = store.manifest()["tables"]["layer_concepts"]
    rows = pq.read_table(store.path / entry["path"]).to_pylist()
    key = [(r["layer"], r["scorer"], -r["n_units"], r["concept"]) for r in rows]
    assert key == sorted(key) and len({(r["layer"], r["scorer"]) for r in rows}) == 3
    assert rows[0]["concept"] == "c9" and rows[0]["n_units"] == 20
    assert [c for c in rows[0]] == [c.name for c in store.schemas["layer_concepts"].file_columns]
    assert {r["run_id"] for r in rows} == {entry["run_id"]}
    store.close()


def test_sort_header_takes_desc_and_rejects_unknown_columns():
    from neurostore.schema import parse_ddl

    ddl = "-- sort: {}\nCREATE TABLE t (\n    a INTEGER,  -- a\n    b VARCHAR   -- b\n);\n"
    assert parse_ddl(ddl.format("a DESC, b")).sort == ("a DESC", "b")
    with pytest.raises(ValueError, match="'c'"):
        parse_ddl(ddl.format("a, c DESC"))

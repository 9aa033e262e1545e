"""A column added to schema/ after a store was written: the old files stay readable, the new
column reads as NULL in them, and new writes carry it."""

import dataclasses

import pyarrow as pa

from neurostore.schema import Column
from neurostore.store import Store


def rows(n, **extra):
    t = {"vocabulary": ["v"] * n, "concept": [f"c{i}" for i in range(n)], "category": ["x"] * n}
    t.update(extra)
    return pa.table(t)


def test_added_column_reads_null_in_older_files(tmp_path):
    store = Store.open(tmp_path / "s")
    with store.run("old", {"n": 1}) as run:
        run.write("concepts", rows(3))
    # The next version of neurostore adds a column to schema/concepts.sql.
    newer = Store.open(tmp_path / "s")
    ts = newer.schemas["concepts"]
    newer.schemas["concepts"] = dataclasses.replace(
        ts, columns=ts.columns + (Column("weight", "FLOAT", "added later"),))
    got = newer.sql("SELECT concept, weight FROM concepts ORDER BY concept").to_pylist()
    assert got == [{"concept": f"c{i}", "weight": None} for i in range(3)]
    with newer.run("new", {"n": 2}) as run:
        run.write("concepts", rows(2, weight=[0.5, 1.5]))
    got = newer.sql("SELECT count(*) AS n, sum(weight) AS w, count(weight) AS k FROM concepts").to_pylist()[0]
    assert got == {"n": 5, "w": 2.0, "k": 2}


def test_manifest_records_file_columns(tmp_path):
    store = Store.open(tmp_path / "s")
    with store.run("w", {}) as run:
        run.write("concepts", rows(2))
    entry = store.manifest()["tables"]["concepts"][0]
    assert entry["columns"] == ["vocabulary", "concept", "category", "run_id"]

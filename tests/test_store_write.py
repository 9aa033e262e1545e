"""How the store stages a large write (a dissect's pooled rows): partitions sliced, encoded,
synced and hashed in parallel threads; float lists byte-stream-split. Real Parquet and DuckDB."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from neurostore.store import files

LAYERS = {"conv1": 3, "layer1": 5, "layer4": 8}
SPECIAL = np.array([np.nan, -0.0, np.inf, -np.inf, 1e-45, np.finfo(np.float32).max, -1.5, 0.0], np.float32)


def pooled_rows(n_images: int = 40, seed: int = 0, interleaved: bool = False) -> pa.Table:
    """Pooled rows of three layers, layer after layer (as RecordResult.pooled_table builds them)
    or interleaved; floats include NaN, -0.0, infinities and a denormal; one act_max is NULL and
    one act_mean is empty."""
    rng = np.random.default_rng(seed)
    parts = []
    for layer, u in LAYERS.items():
        mean = rng.standard_normal((n_images, u)).astype(np.float32)       # [n, units]
        mx = rng.standard_normal((n_images, u)).astype(np.float16).astype(np.float32)
        mean[0, :u] = SPECIAL[:u]
        means = [list(r) for r in mean]
        means[1] = []
        maxes = [list(r) for r in mx]
        maxes[2] = None
        parts.append(pa.table({
            "dataset": ["probe"] * n_images, "image_id": [f"img{i:04d}" for i in range(n_images)],
            "act_mean": pa.array(means, pa.list_(pa.float32())), "act_max": pa.array(maxes, pa.list_(pa.float32())),
            "model": ["m"] * n_images, "layer": [layer] * n_images}))
    t = pa.concat_tables(parts)
    if interleaved:
        t = t.take(np.argsort(np.tile(np.arange(n_images), len(LAYERS)), kind="stable"))
    return t


def bits(t: pa.Table, col: str) -> tuple:
    """A list column as (lengths with -1 for NULL, float bits): equal tuples are equal values."""
    c = t.column(col).combine_chunks()
    return (c.value_lengths().fill_null(-1).to_pylist(),
            pc.list_flatten(c).to_numpy(zero_copy_only=False).astype(np.float32).view(np.uint32).tolist())


def same(a: pa.Table, b: pa.Table) -> bool:
    """Equal rows, float bits included (Table.equals takes NaN for unequal to itself)."""
    flat = ["dataset", "image_id", "model", "layer"]
    return a.select(flat).equals(b.select(flat)) and all(bits(a, c) == bits(b, c) for c in ("act_mean", "act_max"))


def read_back(store) -> pa.Table:
    return store.sql("SELECT * EXCLUDE (run_id) FROM pooled ORDER BY layer, image_id")


def test_pooled_rows_read_back_bit_for_bit_from_byte_stream_split_files(store):
    t = pooled_rows()
    with store.run("dissect", {"model": "m"}) as run:
        run.write("pooled", t, key="record:probe")
    back = read_back(store)
    want = t.sort_by([("layer", "ascending"), ("image_id", "ascending")])
    assert same(back, want)
    # the layout: one file per layer, float lists byte-stream-split without min/max statistics,
    # the flat columns as before (image_id keeps the statistics a lookup prunes by)
    paths = sorted((store.path / "tables/pooled").rglob("*.parquet"))
    assert [p.parent.name for p in paths] == [f"layer={l}" for l in sorted(LAYERS)]
    for p in paths:
        rg = pq.ParquetFile(p).metadata.row_group(0)
        cols = {rg.column(i).path_in_schema: rg.column(i) for i in range(rg.num_columns)}
        for leaf in ("act_mean.list.element", "act_max.list.element"):
            assert "BYTE_STREAM_SPLIT" in cols[leaf].encodings and not cols[leaf].is_stats_set
        assert cols["image_id"].is_stats_set and "RLE_DICTIONARY" in cols["image_id"].encodings
    # the size and hash each thread recorded are the file's: check verifies every byte
    report = store.check()
    assert report["clean"], report["problems"]


def test_interleaved_partitions_are_split_like_contiguous_ones(store):
    """Rows of a partition that come in one run are sliced; rows that do not are filtered: the
    same partitions, rows and values either way."""
    ts = store.schemas["pooled"]
    for interleaved in (False, True):
        t = pooled_rows(interleaved=interleaved)
        parts = files._split_partitions(ts, t)
        assert sorted(p["layer"] for p, _ in parts) == sorted(LAYERS)
        for part, chunk in parts:
            assert set(chunk.column("layer").to_pylist()) == {part["layer"]}
            assert chunk.num_rows == 40
    assert files._run_starts(pa.table({"a": ["x", "x", "y", "x"], "b": [1, 1, 1, 1]})) == [0, 2, 3]
    assert files._run_starts(pa.table({"a": ["x", "x"], "b": [1, 2]})) == [0, 1]
    with store.run("dissect", {"order": "interleaved"}) as run:
        run.write("pooled", pooled_rows(interleaved=True), key="record:probe")
    assert same(read_back(store), pooled_rows().sort_by([("layer", "ascending"), ("image_id", "ascending")]))


def test_a_failed_partition_thread_fails_the_run_and_keeps_committed_rows(store):
    """One partition's file cannot be written (its path is taken by a folder): the write raises
    after every thread has stopped, the run is recorded failed, nothing of it is visible or left
    in staging, and the rows committed before are all still there."""
    with store.run("dissect", {"n": 1}) as run:
        run.write("pooled", pooled_rows(seed=1), key="record:probe")
    before = read_back(store)
    with pytest.raises(OSError):
        with store.run("dissect", {"n": 1}) as run:   # the same work: its commit would replace the rows
            blocked = (run.staging / "chunks/pooled/model=m/layer=layer1" /
                       hashlib.sha1(b"record:probe").hexdigest()[:12] / "00000.parquet")
            blocked.mkdir(parents=True)
            run.write("pooled", pooled_rows(seed=2), key="record:probe")
    assert run.state == "failed"
    assert same(read_back(store), before)
    assert [r["status"] for r in store.runs().to_pylist()] == ["failed", "committed"]
    assert not list((store.path / "staging").iterdir())
    assert store.check()["clean"]


def test_a_large_partition_is_several_files_read_back_as_one(store, monkeypatch):
    """A partition over FILE_BYTES is staged as several files cut at row-group boundaries, encoded
    in parallel: read back, the rows are the same and in the same order; the same work again
    replaces every one of them; a second write to the slot merges all into one sorted file."""
    monkeypatch.setattr(files, "FILE_BYTES", 2000)
    monkeypatch.setitem(files.ROW_GROUP_ROWS, "pooled", 8)
    t = pooled_rows(n_images=40)
    want = t.sort_by([("layer", "ascending"), ("image_id", "ascending")])
    for _ in range(2):   # the second run replaces all of the first one's files
        with store.run("dissect", {"model": "m"}) as run:
            run.write("pooled", t, key="record:probe")
        layer4 = [store.path / e["path"] for e in store.manifest()["tables"]["pooled"] if e["partition"]["layer"] == "layer4"]
        assert len(layer4) > 1 and all(files._file_facts(f)["run_id"] == run.run_id for f in layer4)
        groups = [pq.ParquetFile(f).metadata.row_group(i).num_rows for f in layer4
                  for i in range(pq.ParquetFile(f).metadata.num_row_groups)]
        assert groups == [8] * 5 and sum(pq.ParquetFile(f).metadata.num_rows for f in layer4) == 40
        assert same(read_back(store), want)
        # in manifest order (the order the views read them), unsorted, the rows are in image order
        ids = store.sql("SELECT image_id FROM pooled WHERE layer = 'layer4'")["image_id"].to_pylist()
        assert ids == sorted(ids)
        assert store.check()["clean"]
    assert {e["run_id"] for e in store.manifest()["tables"]["pooled"]} == {run.run_id}
    with store.run("dissect", {"model": "m"}) as run:
        run.write("pooled", t.slice(0, 100), key="record:probe")
        run.write("pooled", t.slice(100), key="record:probe")
    # rows 0..99: conv1, layer1 and half of layer4; layer4's second half is a second chunk
    assert [e["partition"]["layer"] for e in store.manifest()["tables"]["pooled"]].count("layer4") == 1
    assert same(read_back(store), want)


def test_a_lost_manifest_is_rebuilt_with_every_file_of_a_large_partition(store, monkeypatch):
    """check --repair rebuilds the manifest from the files' footers and the runs' file lists:
    a partition written as several files comes back whole."""
    monkeypatch.setattr(files, "FILE_BYTES", 2000)
    monkeypatch.setitem(files.ROW_GROUP_ROWS, "pooled", 8)
    with store.run("dissect", {"model": "m"}) as run:
        run.write("pooled", pooled_rows(), key="record:probe")
    before, entries = read_back(store), store.manifest()["tables"]["pooled"]
    (store.path / "manifest.json").unlink()
    report = store.check(repair=True)
    assert not report["dropped"], report
    assert store.manifest()["tables"]["pooled"] == entries and same(read_back(store), before)

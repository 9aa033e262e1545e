"""Explanation rows folded from score rows: one per (unit, scorer), lists in rank order."""

import pyarrow as pa

from neurostore.explain import explanations_table

SCHEMA = pa.schema([("unit", pa.int32()), ("scorer", pa.string()), ("rank", pa.int32()), ("concept", pa.string()),
                    ("score", pa.float32()), ("confidence", pa.float32()), ("encoder", pa.string()),
                    ("model", pa.string())])


def test_rows_fold_into_one_explanation_per_unit_and_scorer():
    rows = [  # shuffled: the fold orders by scorer, unit, rank
        (7, "wpmi", 1, "cat", 0.2, 0.1, None), (2, "patch", 1, "red", 0.5, 0.4, "enc"),
        (7, "wpmi", 0, "dog", 0.9, 0.8, None), (2, "patch", 0, "ring", 0.7, 0.6, "enc"),
        (2, "patch", 2, "sky", 0.1, 0.05, "enc"), (7, "patch", 0, "grass", 0.3, 0.2, "enc")]
    t = pa.Table.from_pylist([dict(zip(SCHEMA.names, (*r, "m"))) for r in rows], schema=SCHEMA)
    out = explanations_table(t, {(2, "patch"): ("A red ring.", "template")}).to_pylist()
    assert [(r["scorer"], r["unit"]) for r in out] == [("patch", 2), ("patch", 7), ("wpmi", 7)]
    assert out[0]["concepts"] == ["ring", "red", "sky"] and out[0]["label"] == "ring"
    assert out[0]["confidences"] == [out[0]["confidence"], *out[0]["confidences"][1:]]
    assert abs(out[0]["confidences"][1] - 0.4) < 1e-6
    assert (out[0]["summary"], out[0]["summary_by"]) == ("A red ring.", "template") and out[1]["summary"] is None
    assert out[2]["encoder"] is None and out[2]["model"] == "m" and out[2]["concepts"] == ["dog", "cat"]
    empty = explanations_table(t.slice(0, 0))
    assert empty.num_rows == 0 and empty.schema == explanations_table(t).schema

"""Importing other methods' published explanations (CLIP-Dissect, MILAN, Network Dissection, any
CSV/JSONL) into the store: counts, units and layers that line up, raw beside normalised labels,
rejects, replacement on re-import, and one-line errors that leave the store as it was."""

import csv
import json
from pathlib import Path

import pytest
from neurostore.errors import NeurostoreError
from neurostore.fieldresults import import_results, normalise_label
from neurostore.store import Store

from _cli import run_cli

FIELD = Path(__file__).resolve().parents[2] / "shared/data/field-results"
needs_files = pytest.mark.skipif(not (FIELD / "milan-base_resnet50_imagenet.csv").is_file(),
                                 reason=f"the shared field results are not at {FIELD}")
ND_LAYERS = ("layer1", "layer2", "layer3", "layer4", "fc")


def nd_files():
    return [FIELD / f"netdissect_resnet50_imagenet_{layer}.csv" for layer in ND_LAYERS]


@pytest.fixture(scope="module")
def field_store(tmp_path_factory):
    """The three shared methods imported into one store (the issue's 'done when')."""
    if not (FIELD / "milan-base_resnet50_imagenet.csv").is_file():
        pytest.skip(f"the shared field results are not at {FIELD}")
    path = tmp_path_factory.mktemp("field") / "store"
    out = {"clip-dissect": import_results(path, "clip-dissect", [FIELD / "clip-dissect_resnet50_imagenet.csv"],
                                          model="resnet50"),
           "milan": import_results(path, "milan", [FIELD / "milan-base_resnet50_imagenet.csv"], model="resnet50"),
           "netdissect": import_results(path, "netdissect", nd_files(), model="resnet50")}
    return Store.open(path, create=False), out


def counts(st, table="explanations"):
    return {r["scorer"]: r["n"] for r in st.sql(f"SELECT scorer, count(*) AS n FROM {table} GROUP BY scorer").to_pylist()}


def small_csv(tmp_path, name, header, rows):
    p = tmp_path / name
    with open(p, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return p


@needs_files
def test_shared_files_import_with_the_published_row_counts(field_store):
    st, res = field_store
    assert counts(st) == {"clip-dissect": 3904, "milan": 4904, "netdissect": 3840 + 1000}
    nd = st.sql("SELECT layer, count(*) AS n FROM explanations WHERE scorer = 'netdissect' GROUP BY layer").to_pylist()
    assert {r["layer"]: r["n"] for r in nd} == {"layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048, "fc": 1000}
    # the run records each source file, its content hash and the format
    run = st.sql("SELECT params FROM runs WHERE run_id = $r", {"r": res["netdissect"].run_id}).to_pylist()[0]
    files = json.loads(run["params"])["files"]
    assert [Path(f["path"]).name for f in files] == [p.name for p in nd_files()]
    assert all(f["format"] == "netdissect" and len(f["sha256"]) == 64 for f in files)


@needs_files
def test_units_and_layers_line_up_across_methods_checked_by_hand(field_store):
    st, _ = field_store

    def cand(method, layer, unit):
        return st.sql("SELECT rank, category, label, label_raw, score, truth_px, active_px, intersect_px "
                      "FROM explanation_candidates WHERE method = $m AND layer = $l AND unit = $u ORDER BY rank",
                      {"m": method, "l": layer, "u": unit}).to_pylist()

    # clip-dissect file line 2: "conv1,0,red,0.25616455"
    (c,) = cand("clip-dissect", "conv1", 0)
    assert (c["label"], c["label_raw"]) == ("red", "red") and c["score"] == pytest.approx(0.25616455)
    # netdissect layer4 line 2: unit 1 (1-based) -> unit 0: part 'body' IoU 0.042096571; runners-up kept
    nd = cand("netdissect", "layer4", 0)
    assert (nd[0]["category"], nd[0]["label"], nd[0]["score"]) == ("part", "body", pytest.approx(0.042096571))
    assert (nd[0]["truth_px"], nd[0]["active_px"], nd[0]["intersect_px"]) == (1291612, 774358, 83457)
    assert [(r["category"], r["label_raw"]) for r in nd[1:]] == [
        ("object", "bottle"), ("material", "metal"), ("texture", "grooved"), ("scene", "game_room-s"), ("color", "grey-c")]
    assert nd[4]["label"] == "game room" and nd[5]["label"] == "grey"
    # netdissect fc line 4: unit 3 -> 2, scene label with its suffix and underscore
    (top, *_) = cand("netdissect", "fc", 2)
    assert (top["label_raw"], top["label"], top["category"]) == ("aquatic_theater-s", "aquatic theater", "scene")
    # milan fc line 35: a quoted free-text label with a comma
    (m,) = cand("milan", "fc", 33)
    assert (m["label_raw"], m["label"]) == ("Aquatic life, animals", "aquatic life, animals")
    # the same neuron, layer4/0, has one label per method, and each method covers every unit of each layer
    per = st.sql("""SELECT e.layer, e.scorer, count(*) AS n, min(e.unit) AS lo, max(e.unit) AS hi, any_value(l.n_units) AS units
                    FROM explanations e JOIN layers l USING (model, layer) GROUP BY ALL""").to_pylist()
    assert all(r["n"] == r["units"] and r["lo"] == 0 and r["hi"] == r["units"] - 1 for r in per)
    depth = st.sql("SELECT layer FROM layers WHERE model = 'resnet50' ORDER BY depth").column("layer").to_pylist()
    assert depth == ["conv1", "layer1", "layer2", "layer3", "layer4", "fc"]


def test_normalise_label():
    assert normalise_label("aquatic_theater-s", "netdissect") == "aquatic theater"
    assert normalise_label("purple-c", "netdissect") == "purple"
    assert normalise_label("plastic-opaque", "netdissect") == "plastic opaque"
    assert normalise_label('  "Dogs\' faces."  ') == "dogs' faces"
    assert normalise_label("T-shirt") == normalise_label("t shirt")


def test_bad_lines_are_rejects_and_reimport_replaces(tmp_path):
    st_path = tmp_path / "s"
    good = [("layer4", u, f"label {u}") for u in range(8)]
    f = small_csv(tmp_path, "milan.csv", ["layer", "unit", "description"],
                  good + [("layer4", "x", "not a unit"), ("layer4", 9999, "out of range"), ("layer4", 3, "again"),
                          ("layer4", 5, "")])
    res = import_results(st_path, "milan", [f], model="resnet50")
    st = Store.open(st_path, create=False)
    assert counts(st) == {"milan": 8}
    reasons = [r["reason"] for r in st.sql("SELECT reason FROM rejects ORDER BY reason").to_pylist()]
    assert reasons == ["line 10: unit 'x' is not a number", "line 11: unit 9999 is out of range: resnet50 layer4 has 2048 units",
                       "line 12: unit 3 of layer4 again (first on line 5)", "line 13: empty label"]
    assert res.files[0]["rejects"] == 4
    # another method beside it; then the same milan file again replaces, not duplicates
    g = small_csv(tmp_path, "g.csv", ["neuron", "text"], [(u, "dog") for u in range(1, 4)])
    import_results(st_path, "csv", [g], model="resnet50", layer="layer4", columns="unit=neuron,label=text",
                   method="falcon", unit_base=1)
    again = import_results(st_path, "milan", [f], model="resnet50")
    assert again.replaced == {"layer4": 8} and res.replaced == {}   # said, not silent
    assert again.dropped == {}   # the same units described again
    # the second half of a split file, imported alone: the first half's units are said to be gone
    half = small_csv(tmp_path, "half.csv", ["layer", "unit", "description"], [("layer4", u, "x") for u in range(5, 8)])
    split = import_results(st_path, "milan", [half], model="resnet50")
    assert split.replaced == {"layer4": 8} and split.dropped == {"layer4": 5}
    again = import_results(st_path, "milan", [f], model="resnet50")
    assert counts(st) == {"milan": 8, "falcon": 3}
    assert st.sql("SELECT count(*) AS n FROM rejects").column("n")[0].as_py() == 4
    assert st.sql("SELECT list(unit ORDER BY unit) AS u FROM explanations WHERE scorer = 'falcon'").column("u")[0].as_py() == [0, 1, 2]


def test_jsonl_with_a_column_mapping(tmp_path):
    p = tmp_path / "tool.jsonl"
    p.write_text("\n".join(json.dumps({"L": "layer3", "n": u, "desc": "Stripes", "s": 0.5}) for u in range(4))
                 + "\n{not json\n")
    res = import_results(tmp_path / "s", "jsonl", [p], model="resnet50", method="mytool",
                         columns={"layer": "L", "unit": "n", "label": "desc", "score": "s"})
    assert res.rows["explanations"] == 4 and res.rejects[0]["reason"].startswith("line 5: not JSON")
    row = Store.open(tmp_path / "s").sql("SELECT label, label_raw, score FROM explanation_candidates LIMIT 1").to_pylist()[0]
    assert row == {"label": "stripes", "label_raw": "Stripes", "score": 0.5}


@needs_files
@pytest.mark.parametrize("fmt,files,kw,message", [
    ("clip-dissect", ["milan-base_resnet50_imagenet.csv"], {}, "line 1: the header has no 'similarity' column"),
    ("milan", ["clip-dissect_resnet50_imagenet.csv"], {}, "it looks like a clip-dissect file"),
    ("milan", ["netdissect_resnet50_imagenet_fc.csv"], {}, "it looks like a netdissect file"),
    ("clip-dissect", ["clip-dissect_resnet50_imagenet.csv"], {"model": "resnet18"},
     "line 130: unit 64 is out of range: resnet18 layer1 has 64 units"),
    ("netdissect", ["netdissect_resnet50_imagenet_fc.csv"], {"layer": "layer9"}, "Unknown layer 'layer9' for resnet50"),
    ("netdissect", ["netdissect_resnet50_imagenet_layer4.csv"], {"layer": "layer1"}, "is out of range: resnet50 layer1"),
    ("milan", ["milan-base_resnet50_imagenet.csv"], {"model": "ResNet50"}, "is not a model id"),
    ("csv", ["milan-base_resnet50_imagenet.csv"], {"method": "x"}, "--columns must map unit, label, layer"),
    ("milan", ["milan-base_resnet50_imagenet.csv"], {"unit_base": 1}, "--unit-base is for the csv and jsonl formats"),
])
def test_bad_input_is_one_line_and_the_store_is_intact(tmp_path, fmt, files, kw, message):
    st_path = tmp_path / "s"
    keep = small_csv(tmp_path, "keep.csv", ["layer", "unit", "description"], [("layer1", 0, "keep me")])
    import_results(st_path, "milan", [keep], model="resnet50")
    before = Store.open(st_path).table_counts()
    kw = {"model": "resnet50", **kw}
    with pytest.raises(NeurostoreError) as e:
        import_results(st_path, fmt, [FIELD / f for f in files], **kw)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert Store.open(st_path).table_counts() == before


def test_damaged_and_half_bad_imports_leave_nothing(tmp_path):
    st_path = tmp_path / "s"
    ok = small_csv(tmp_path, "ok.csv", ["layer", "unit", "description"], [("layer2", u, "x") for u in range(5)])
    binary = tmp_path / "bin.csv"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    for bad, msg in ((binary, "not a UTF-8 text file"), (empty, "the file is empty"),
                     (tmp_path / "missing.csv", "no such file")):
        with pytest.raises(NeurostoreError, match=msg):
            import_results(st_path, "milan", [ok, bad], model="resnet50")  # the good first file is not imported either
    assert Store.open(st_path).sql("SELECT count(*) AS n FROM explanations").column("n")[0].as_py() == 0




def test_cli_import_json_and_error_line(tmp_path, capsys, monkeypatch):
    f = small_csv(tmp_path, "cd.csv", ["layer", "unit", "description", "similarity"], [("layer4", 7, "dog", "0.3")])
    s = tmp_path / "s"
    code, out, _ = run_cli(capsys, monkeypatch, "import", "clip-dissect", f, "--model", "resnet50", "--store", s, "--json")
    assert code == 0
    res = json.loads(out)
    assert res["method"] == "clip-dissect" and res["rows"]["explanations"] == 1
    code, out, err = run_cli(capsys, monkeypatch, "import", "milan", f, "--model", "resnet50", "--store", s)
    assert code == 1 and out == ""
    assert err.strip().splitlines() == [
        f"Error: {f} line 1: a milan file has the columns layer, unit, description, this one has layer, unit, "
        "description, similarity; it looks like a clip-dissect file."]


@needs_files
def test_find_answers_from_every_methods_labels(field_store):
    from neurostore.analysis import find

    st, _ = field_store
    res = find(st, "dog", models=["resnet50"], methods=("label",), top=500)
    units = res.units.to_pylist()
    assert {u["method"] for u in units} == {"label:clip-dissect", "label:milan", "label:netdissect"}
    assert all(u["method"] == f"label:{u['scorer']}" for u in units)
    hits = {(u["scorer"], u["layer"], u["unit"]): u for u in units}
    # by hand: clip-dissect file line 925 'layer3,91,dog'; netdissect layer2 line 430 '429,object,dog' (1-based)
    assert hits[("clip-dissect", "layer3", 91)]["similarity"] == 1.0
    assert hits[("netdissect", "layer2", 428)]["concept"] == "dog"
    assert all("dog" in u["concept"] for u in units)  # 'dogs', 'hot dog', never 'dogwood'-like partial words
    assert all(u["confidence"] is None for u in units)  # a published label has no calibrated confidence (read 1.0)
    prof = {(p["method"], p["layer"]): p["n_confident"] for p in res.profile.to_pylist()}
    assert prof[("label:netdissect", "layer4")] > prof[("label:netdissect", "layer1")] == 0


@needs_files
def test_neuron_page_shows_every_methods_label_side_by_side(field_store):
    from neurostore.web import data as D
    from neurostore.web.render import Links, render

    st, _ = field_store
    card = D.neuron_card(st.sql, "resnet50", "fc", 2)
    assert [s["scorer"] for s in card["summaries"]] == ["milan", "netdissect"]
    html = render("neuron.html", card, Links(static=True, depth=3), store_path=str(st.path))
    assert "Labels by method" in html and html.count('class="card method"') == 2
    # a model only imported: no neurostore explanation, and no command offered that cannot run on it
    assert "resnet50 was not dissected here" in html and "No explanation for this unit yet" not in html
    assert "neurostore groups resnet50" not in html and "run <code>neurostore audit</code>" not in html
    assert "aquatic theater" in html and "<code>aquatic_theater-s</code>" in html  # normalised beside raw
    # Network Dissection's runners-up from line 4: object 'water' (IoU 0.0839), texture 'smeared'
    assert "runner-up" in html and "<td>water</td>" in html and "<td>smeared</td>" in html
    # the index and model page count imported units as explained, with their methods (they read 0 before)
    fc = next(l for m in D.overview(st.sql)["models"] if m["model"] == "resnet50" for l in m["layers"] if l["layer"] == "fc")
    assert fc["n_scored"] == 1000 and fc["scorers"] == ["milan", "netdissect"]
    # the web search finds imported-only units by their published labels (exact, semantic and open cannot)
    found = D.search(st.sql, "dog")
    labelled = [u for u in found["units"] if u["found_by"] == "label"]
    assert found["counts"]["label"] == len(labelled) > 0 and found["counts"]["exact"] == 0
    assert {u["scorer"] for u in labelled} <= {"clip-dissect", "milan", "netdissect"}
    assert ("clip-dissect", "layer3", 91) in {(u["scorer"], u["layer"], u["unit"]) for u in labelled}
    sims = [u["similarity"] for u in labelled]
    assert sims == sorted(sims, key=lambda v: v is None) and sims[0] == 1.0   # labels that are 'dog' first
    only = D.search(st.sql, "dog", "label", k=500)
    assert all(u["exact"] >= v["exact"] for u, v in zip(only["units"], only["units"][1:]))   # 'dog' before 'hot dog'
    html = render("search.html", found, Links(static=True, depth=1), store_path=str(st.path))
    assert "published label" in html and "clip-dissect" in html
    # neuron -> concepts answers with every method's labels (it read 0 rows for a unit only imported);
    # by hand: clip-dissect line 925 'layer3,91,dog'
    got = st.query("neuron_concepts", {"model": "resnet50", "layer": "layer3", "unit": 91}).to_pylist()
    assert {r["scorer"] for r in got} == {"clip-dissect", "milan", "netdissect"}
    cd = next(r for r in got if r["scorer"] == "clip-dissect")
    assert (cd["rank"], cd["concept"], cd["confidence"], cd["vocabulary"]) == (0, "dog", None, "clip-dissect:20k")
    # the model page's concepts-by-depth plot, empty before for a model only imported, is Network
    # Dissection's own figure: textures early, objects late (its paper's finding, in its published labels)
    prof = D.depth_profile(st.sql, "resnet50")
    assert prof["imported"] and prof["scorer"] == "netdissect" and prof["by"] == "category"
    assert prof["layers"] == ["conv1", "layer1", "layer2", "layer3", "layer4"]   # not the logits
    tex, obj = prof["series"]["texture"], prof["series"]["object"]
    assert tex[0] is None and tex[1] > 0.7 > 0.3 > tex[4] and obj[1] < 0.05 < 0.4 < obj[4]
    # the layer page lists imported-only units (with each method's label) so the report writes their pages
    page = D.layer_page(st.sql, "resnet50", "layer4")
    assert len(page["units"]) == 2048
    assert {b["scorer"] for b in page["units"][0]["best"]} == {"clip-dissect", "milan", "netdissect"}


def test_compare_methods_per_layer_and_disagreements(tmp_path, capsys, monkeypatch):
    s = tmp_path / "s"
    a = small_csv(tmp_path, "a.csv", ["layer", "unit", "label"],
                  [("layer4", 0, "dog"), ("layer4", 1, "striped"), ("layer4", 2, "sky"), ("layer3", 0, "grass")])
    b = small_csv(tmp_path, "b.csv", ["layer", "unit", "label"],
                  [("layer4", 0, "Dog"), ("layer4", 1, "zebra stripes"), ("layer4", 2, "keyboard"), ("layer3", 0, "grass")])
    for name, f in (("a", a), ("b", b)):
        import_results(s, "csv", [f], model="resnet50", method=name, columns="layer=layer,unit=unit,label=label")
    code, out, _ = run_cli(capsys, monkeypatch, "compare", "resnet50", "--methods", "a,b", "--store", s, "--json")
    assert code == 0
    res = json.loads(out)
    by = {r["layer"]: r for r in res["layers"]}
    assert [r["layer"] for r in res["layers"]] == ["layer3", "layer4"]  # depth order
    assert (by["layer4"]["units"], by["layer4"]["same_label"], by["layer4"]["agreement"]) == (3, 1, pytest.approx(1 / 3, abs=1e-4))
    assert by["layer3"]["mean_similarity"] == pytest.approx(1.0, abs=1e-4)
    assert by["layer4"]["mean_similarity"] < 0.9
    assert (res["disagreements"][0]["unit"], res["disagreements"][0]["label_b"]) == (2, "keyboard")  # sky vs keyboard
    code, _, err = run_cli(capsys, monkeypatch, "compare", "resnet50", "--methods", "a,c", "--store", s)
    assert code == 1 and err.startswith("Error: Unknown method with explanations of resnet50 'c'.")


def test_a_quote_never_closed_costs_its_lines_as_rejects_not_silently(tmp_path):
    """An unclosed quote swallows the records after it into one field: each lost line is a reject
    (they vanished before, and the field became one unit's label)."""
    f = tmp_path / "milan.csv"
    f.write_text("layer,unit,description\n" + "".join(f"layer4,{u},label {u}\n" for u in range(10))
                 + 'layer4,10,"broken\nlayer4,11,x\nlayer4,12,y\n')
    res = import_results(tmp_path / "s", "milan", [f], model="resnet50")
    assert res.rows["explanations"] == 10 and res.files[0]["rejects"] == 3
    assert [r["reason"] for r in res.rejects] == [f"line {n}: inside a quote opened on line 12 and not closed until "
                                                 "line 14" for n in (12, 13, 14)]


def test_a_dissected_model_takes_only_its_own_layers_and_units(demo_run, tmp_path):
    """Results imported for a model the store holds from a dissect are checked against its layers
    and unit counts (they made up layers and units before)."""
    import shutil

    _, demo = demo_run
    shutil.copytree(demo.path, tmp_path / "s")
    rows = [("conv4", u, f"label {u}") for u in range(10)] + [("conv4", 64, "too far"), ("layer9", 0, "no layer")]
    f = small_csv(tmp_path, "x.csv", ["layer", "unit", "text"], rows)
    res = import_results(tmp_path / "s", "csv", [f], model="probe-cnn", method="falcon",
                         columns="layer=layer,unit=unit,label=text")
    assert res.rows["explanations"] == 10 and [r["reason"] for r in res.rejects] == [
        "line 12: unit 64 is out of range: probe-cnn conv4 has 64 units", "line 13: layer 'layer9' is not a layer of probe-cnn"]
    layers = Store.open(tmp_path / "s").sql("SELECT DISTINCT layer FROM layers WHERE model = 'probe-cnn'")["layer"]
    assert "layer9" not in layers.to_pylist()


def test_quoted_free_text_over_two_lines_and_physical_line_numbers(tmp_path):
    f = tmp_path / "milan.csv"
    f.write_text('layer,unit,description\nlayer4,0,"Dogs,\nin grass"\nlayer4,1,x,extra\nlayer4,2,ok\n')
    res = import_results(tmp_path / "s", "milan", [f], model="resnet50")
    assert res.rejects == [{"path": str(f), "reason": "line 4: 4 fields, the header has 3"}]
    rows = Store.open(tmp_path / "s").sql("SELECT unit, label, label_raw, line FROM explanation_candidates ORDER BY unit")
    assert rows.to_pylist() == [{"unit": 0, "label": "dogs, in grass", "label_raw": "Dogs,\nin grass", "line": 3},
                                {"unit": 2, "label": "ok", "label_raw": "ok", "line": 5}]

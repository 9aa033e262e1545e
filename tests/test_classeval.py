"""Evaluation of a class layer's explanations against its class names: top-1 with synonyms and
normalisation on both sides, label/class cosine in MiniLM (or a local sentence-transformers
folder), results in `evaluations`; the published all-mpnet-base-v2 figures (slow, opt-in)."""

import csv
import json
import os
import sys
from pathlib import Path

import pytest

from neurostore.classeval import evaluate_classes, load_classes
from neurostore.errors import NeurostoreError
from neurostore.fieldresults import import_results
from neurostore.store import Store

FIELD = Path(__file__).resolve().parents[2] / "shared/data/field-results"
needs_files = pytest.mark.skipif(not (FIELD / "netdissect_resnet50_imagenet_fc.csv").is_file(),
                                 reason=f"the shared field results are not at {FIELD}")


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["unit", "label"])
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def fc_store(tmp_path_factory):
    """Two hand-made methods on resnet50 fc units 0-3 (ImageNet: tench, goldfish, great white
    shark, tiger shark)."""
    d = tmp_path_factory.mktemp("classeval")
    # 'exact': every label is a class name or synonym in another spelling -> top-1 = 1
    exact = write_csv(d / "exact.csv", [(0, "Tench"), (1, "Carassius_auratus"), (2, "man-eater"), (3, "tiger shark."),
                                        (134, "crane bird")])  # torchvision's name for class 134 (the vocabulary's)
    # 'lines': labels that are the class's whole line -> cosine 1, but not a single name -> top-1 0
    lines = write_csv(d / "lines.csv", [(u, ln) for u, ln in enumerate(
        ["tench, Tinca tinca", "goldfish, Carassius auratus"])])
    # 'off': one right, three unrelated
    off = write_csv(d / "off.csv", [(0, "tench"), (1, "a red brick wall"), (2, "keyboard"), (3, "cloudy sky")])
    cols = "unit=unit,label=label"
    for name, f in (("exact", exact), ("lines", lines), ("off", off)):
        import_results(d / "s", "csv", [f], model="resnet50", layer="fc", columns=cols, method=name)
    return d / "s"


def test_top1_and_cosine_per_method(fc_store):
    res = evaluate_classes(fc_store, "resnet50", "fc", "imagenet")
    by = {m["method"]: m for m in res.to_dict()["methods"]}
    assert by["exact"]["top1"] == 1.0 and by["exact"]["n"] == 5
    assert by["lines"]["top1"] == 0.0 and by["lines"]["class_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert by["off"]["top1"] == 0.25
    assert by["off"]["class_cosine"] < by["exact"]["class_cosine"] < 1.0
    ev = Store.open(fc_store).sql("SELECT scorer, metric, value, n, dataset FROM evaluations "
                                  "WHERE model = 'resnet50' AND layer = 'fc' ORDER BY scorer, metric").to_pylist()
    assert [(r["scorer"], r["metric"]) for r in ev] == [
        ("exact", "class_cosine:all-MiniLM-L6-v2"), ("exact", "class_top1"), ("lines", "class_cosine:all-MiniLM-L6-v2"),
        ("lines", "class_top1"), ("off", "class_cosine:all-MiniLM-L6-v2"), ("off", "class_top1")]
    assert all(r["dataset"] == "imagenet" for r in ev)
    evaluate_classes(fc_store, "resnet50", "fc", "imagenet")  # again: replaces, not duplicates
    assert Store.open(fc_store).sql("SELECT count(*) AS n FROM evaluations").column("n")[0].as_py() == 6


def test_class_lists(tmp_path):
    cid, names = load_classes("imagenet")
    assert cid == "imagenet" and len(names) == 1000 and names[0] == ["tench", "Tinca tinca"]
    assert names[134] == ["crane", "bird"]  # as the published file spells it
    cid, names = load_classes("places365")
    assert len(names) == 365 and names[8] == ["apartment building outdoor"] and names[0] == ["airfield"]
    f = tmp_path / "mine.txt"
    f.write_text("cat, kitty\n\ndog\n")
    assert load_classes(f)[1] == [["cat", "kitty"], ["dog"]]
    f.write_text("/b/barn 1\n/a/airfield 0\n")
    assert load_classes(f)[1] == [["airfield"], ["barn"]]


@pytest.mark.parametrize("kw,message", [
    ({"model": "resnet18"}, "Unknown model with explanations 'resnet18'"),
    ({"layer": "layer4"}, "Unknown layer with explanations of resnet50 'layer4'"),
    ({"classes": "nope"}, "--classes 'nope': not a built-in class list"),
    ({"classes": "places365"}, "has 365 classes"),
    ({"text_model": "/no/such/folder"}, "--text-model '/no/such/folder': no such folder"),
    ({"layer": None}, "needs a model and its class layer"),
])
def test_bad_input_is_one_line(fc_store, kw, message):
    before = Store.open(fc_store).table_counts()
    # units 0-3 fit places365 too: make one beyond its 365 classes
    args = {"model": "resnet50", "layer": "fc", "classes": "imagenet", **kw}
    if kw.get("classes") == "places365":
        f = write_csv(fc_store.parent / "far.csv", [(400, "barn")])
        import_results(fc_store, "csv", [f], model="resnet50", layer="fc", columns="unit=unit,label=label", method="far")
        before = Store.open(fc_store).table_counts()
    with pytest.raises(NeurostoreError) as e:
        evaluate_classes(fc_store, **args)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert Store.open(fc_store).table_counts() == before


@needs_files
def test_cli_eval_classes_json_on_the_published_files(tmp_path, capsys, monkeypatch):
    from neurostore import cli

    s = tmp_path / "s"
    import_results(s, "netdissect", [FIELD / "netdissect_resnet50_imagenet_fc.csv"], model="resnet50")
    import_results(s, "milan", [FIELD / "milan-base_resnet50_imagenet.csv"], model="resnet50")
    monkeypatch.setattr(sys, "argv", ["neurostore", "eval", "--model", "resnet50", "--layer", "fc", "--classes",
                                      "imagenet", "--store", str(s), "--json"])
    with pytest.raises(SystemExit) as done:
        cli.main()
    assert done.value.code == 0
    out = json.loads(capsys.readouterr().out)
    by = {m["method"]: m for m in out["methods"]}
    # by hand from the files: 15 Network Dissection fc labels name their class (e.g. unit 437
    # 'lighthouse-s' ~ 'beacon, lighthouse, ...'), one MILAN label does (unit 837 'Sunglasses')
    assert by["netdissect"]["top1"] == pytest.approx(15 / 1000) and by["milan"]["top1"] == pytest.approx(1 / 1000)
    assert by["netdissect"]["n"] == by["milan"]["n"] == 1000
    assert 0.2 < by["milan"]["class_cosine"] < 0.4 and 0.2 < by["netdissect"]["class_cosine"] < 0.4


MPNET = os.environ.get("NEUROSTORE_MPNET")


@pytest.mark.slow
@needs_files
@pytest.mark.skipif(not MPNET or not Path(MPNET).is_dir(),
                    reason="set NEUROSTORE_MPNET to a local all-mpnet-base-v2 folder (see README: field results)")
def test_published_class_similarity_in_mpnet(tmp_path):
    """CLIP-Dissect's paper: fc label/class cosine in all-mpnet-base-v2, Network Dissection 0.2952,
    MILAN 0.2788."""
    s = tmp_path / "s"
    import_results(s, "netdissect", [FIELD / "netdissect_resnet50_imagenet_fc.csv"], model="resnet50")
    import_results(s, "milan", [FIELD / "milan-base_resnet50_imagenet.csv"], model="resnet50")
    res = evaluate_classes(s, "resnet50", "fc", "imagenet", text_model=MPNET)
    by = {m["method"]: m["class_cosine"] for m in res.methods}
    assert by["netdissect"] == pytest.approx(0.2952, abs=0.01)
    assert by["milan"] == pytest.approx(0.2788, abs=0.01)


def test_only_the_class_logits_are_evaluated_against_a_class_list(tmp_path):
    """A hidden layer, or logits of another width than the class list, are refused by what the
    store knows of the layer (they were scored against tench, goldfish, ... before)."""
    f = write_csv(tmp_path / "l4.csv", [(0, "dog"), (1, "tench")])
    import_results(tmp_path / "s", "csv", [f], model="resnet50", layer="layer4", columns="unit=unit,label=label",
                   method="l4")
    with pytest.raises(NeurostoreError, match="resnet50 layer4 is a .* layer, not the class logits"):
        evaluate_classes(tmp_path / "s", "resnet50", "layer4", "imagenet")


def test_eval_without_classes_on_imported_results_says_what_to_do(fc_store, capsys, monkeypatch):
    """Imported results have no probe-world truth: eval said nothing useful (an empty table), and
    --layer without --classes was ignored."""
    from _cli import run_cli

    code, out, err = run_cli(capsys, monkeypatch, "eval", "--model", "resnet50", "--store", fc_store)
    assert code == 1 and out == "" and "resnet50 has no truth to measure its explanations against here" in err
    assert "neurostore eval --model resnet50 --layer fc --classes imagenet" in " ".join(err.split())
    code, out, err = run_cli(capsys, monkeypatch, "eval", "--model", "resnet50", "--layer", "fc", "--store", fc_store)
    assert code == 1 and "--layer goes with --classes" in err

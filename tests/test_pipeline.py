"""The pipeline end to end on the fast probe world: `neurostore demo` once per session (real
world, real models, real encoder, real store), then checks on what it wrote."""

import json
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from neurostore import scorers as S
from neurostore.cli import app
from neurostore.errors import BadInput, BadParameter, UnknownScorer, UnknownVocabulary, cli_message
from neurostore.pipeline import DEFAULT_SCORERS, DEMO_SCORERS, default_layers, dissect
from neurostore.store import Store


def test_demo_prints_one_json_object(demo_run):
    summary, _ = demo_run
    assert set(summary["dissections"]) == {"cnn", "vit"}
    assert summary["world"]["id"].startswith("probe-")
    assert len(summary["answers"]) == 3
    for a in summary["answers"]:
        assert a["question"] and a["query"]


def test_demo_store_holds_every_stage(demo_run):
    summary, store = demo_run
    counts = store.table_counts()
    for table in ("models", "layers", "images", "masks", "activations", "units", "pooled", "patches",
                  "embeddings", "vocabularies", "concepts", "scores", "concept_units", "explanations",
                  "evaluations"):
        assert counts[table] > 0, table
    # Every unit of every dissected layer has k activation rows, each with its patch.
    for name, d in summary["dissections"].items():
        n = store.sql("SELECT count(*) AS n, count(patch_id) AS p FROM activations WHERE model = $m",
                      {"m": d["model"]}).to_pylist()[0]
        assert n["n"] == n["p"] == d["units"] * 10
        expl = store.sql("SELECT count(*) AS n FROM explanations WHERE model = $m", {"m": d["model"]})
        assert expl["n"][0].as_py() == d["units"] * len(DEMO_SCORERS)
    # Patches are joined to their embeddings, with the encoder the run recorded.
    missing = store.sql("""
        SELECT count(*) AS n FROM patches p
        LEFT JOIN embeddings e ON e.kind = 'patch' AND e.item_id = p.patch_id
        WHERE e.item_id IS NULL""")
    assert missing["n"][0].as_py() == 0


def test_scores_have_bounded_confidence_and_provenance(demo_run):
    _, store = demo_run
    r = store.sql("""SELECT min(confidence) AS lo, max(confidence) AS hi, count(*) FILTER (WHERE run_id IS NULL) AS no_run,
                            count(DISTINCT scorer) AS scorers FROM scores""").to_pylist()[0]
    assert 0.0 <= r["lo"] <= r["hi"] <= 1.0
    assert r["no_run"] == 0 and r["scorers"] == len(DEMO_SCORERS)
    runs = store.sql("SELECT command, status FROM runs WHERE command = 'dissect'").to_pylist()
    assert runs and all(x["status"] == "committed" for x in runs)


def test_cue_units_are_found_for_the_planted_cue(demo_run):
    summary, store = demo_run
    cue = summary["world"]["config"]["cue_kind"]
    # Found: in both models some unit's best concept is the cue, confidently, by IoU against the
    # world's true cue masks; and the concept_neurons query ranks such units first.
    found = store.sql("""SELECT DISTINCT model FROM scores WHERE concept = $c AND rank = 0 AND scorer = 'iou'
                         AND confidence > 0.9 ORDER BY model""", {"c": cue}).column("model").to_pylist()
    assert found == ["probe-cnn", "probe-vit"]
    rows = store.query("concept_neurons", {"concept": cue, "top": 5}).to_pylist()
    assert len(rows) == 5 and rows[0]["confidence"] > 0.9


def test_eval_rows_per_model_layer_scorer(demo_run):
    _, store = demo_run
    ev = store.sql("SELECT model, metric, value FROM evaluations").to_pylist()
    metrics = {r["metric"] for r in ev}
    assert {"top1", "top5", "iou_agreement", "minilm_cosine", "interpretable"} <= metrics
    assert all(0.0 <= r["value"] <= 1.0 for r in ev if r["metric"] != "minilm_cosine")


def test_rerun_replaces_rather_than_duplicates(demo_run, probe_world, tmp_path):
    """Dissecting one layer twice into the same store leaves one copy of every row."""
    store = Store.open(tmp_path / "s")
    kw = dict(world=probe_world, layers=["conv2"], scorers=["patch"], k=5,
              progress=False, log=lambda *a: None, evaluate=False)
    first = dissect(store, f"probe:cnn@{probe_world.root}", **kw)
    assert first["random_weights"] == {"target": False, "encoder": False}
    params = json.loads(store.sql("SELECT params FROM runs WHERE run_id = $r", {"r": first["run_id"]})["params"][0].as_py())
    assert params["random_weights"] == first["random_weights"]
    counts = store.table_counts()
    dissect(store, f"probe:cnn@{probe_world.root}", **kw)
    again = store.table_counts()
    assert {t: n for t, n in again.items() if t != "runs"} == {t: n for t, n in counts.items() if t != "runs"}
    assert counts["activations"] == first["units"] * 5
    # A different scorer is different work: it adds rows beside the patch scores.
    dissect(store, f"probe:cnn@{probe_world.root}", **{**kw, "scorers": ["cos_cubed"]})
    by = {r["scorer"]: r["n"] for r in store.sql("SELECT scorer, count(*) AS n FROM scores GROUP BY scorer").to_pylist()}
    assert by["patch"] == by["cos_cubed"] == first["units"] * 5
    assert store.table_counts()["activations"] == counts["activations"]


def test_default_layers_are_unit_layers(probe_world):
    from neurostore.models import load_target

    vit = load_target(f"probe:vit@{probe_world.root}")
    names = default_layers(vit)
    assert names[-1] == "head"
    assert names[:-1] and all(n.endswith("mlp.fc1") for n in names[:-1]), names


@pytest.mark.parametrize("kwargs, error, text", [
    ({"scorers": ["nope"]}, UnknownScorer, "Unknown scorer 'nope'"),
    ({"vocabulary": "klingon"}, UnknownVocabulary, "Unknown vocabulary 'klingon'"),
    ({"images": "/nonexistent/folder"}, BadInput, "does not exist"),
])
def test_bad_input_fails_before_any_work(probe_world, tmp_path, kwargs, error, text):
    store = Store.open(tmp_path / "s")
    with pytest.raises(error, match=text):
        dissect(store, f"probe:cnn@{probe_world.root}", world=probe_world, progress=False,
                log=lambda *a: None, **kwargs)
    assert store.table_counts()["scores"] == 0


def test_iou_needs_masks(probe_world, tmp_path):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(4):
        Image.new("RGB", (64, 64), (i * 60, 10, 10)).save(folder / f"{i}.png")
    with pytest.raises(BadInput, match="Scorer 'iou' needs per-pixel concept masks"):
        dissect(tmp_path / "s", f"probe:cnn@{probe_world.root}", images=folder, scorers=["iou"],
                encoder=f"probe:{probe_world.root}", progress=False, log=lambda *a: None)


def test_cli_dissect_on_a_folder_with_a_bad_file(probe_world, tmp_path):
    """A user's folder: one good image per colour, one file that is not an image. The run goes
    on, the reject is recorded, and --json prints one object."""
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(12):
        Image.new("RGB", (64, 64), ((i * 40) % 256, 100, 200)).save(folder / f"{i:02d}.png")
    (folder / "notes.txt").write_text("not an image")
    res = CliRunner().invoke(app, ["dissect", f"probe:cnn@{probe_world.root}", "--images", str(folder),
                                   "--layer", "conv2", "--scorer", "patch", "--scorer", "cos_cubed",
                                   "--encoder", f"probe:{probe_world.root}", "--k", "3",
                                   "--store", str(tmp_path / "s"), "--json"])
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout)
    assert s["images"] == 12 and s["rejects"] == 1
    rej = Store.open(tmp_path / "s").sql("SELECT path, reason FROM rejects").to_pylist()
    assert len(rej) == 1 and rej[0]["path"].endswith("notes.txt")
    # without --json the summary says where the reasons are, as a command to paste
    res = CliRunner().invoke(app, ["dissect", f"probe:cnn@{probe_world.root}", "--images", str(folder),
                                   "--layer", "conv2", "--scorer", "patch", "--scorer", "cos_cubed",
                                   "--encoder", f"probe:{probe_world.root}", "--k", "3", "--store", str(tmp_path / "s")])
    assert res.exit_code == 0 and (f"1 files skipped; why: neurostore sql \"SELECT path, reason FROM rejects WHERE "
                                   f"dataset = '{s['dataset']}'\"") in " ".join(res.stdout.split()), res.stdout


def test_probe_model_on_a_folder_uses_its_world_encoder_and_shows_progress_with_json(probe_world, tmp_path):
    """`dissect probe:cnn --images DIR` (no --encoder) uses the world's encoder, never a download;
    with --json, stdout is one JSON object and the stages' progress is on stderr."""
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(6):
        Image.new("RGB", (64, 64), ((i * 40) % 256, 100, 200)).save(folder / f"{i:02d}.png")
    out = subprocess.run([sys.executable, "-m", "neurostore.cli", "dissect", f"probe:cnn@{probe_world.root}",
                          "--images", str(folder), "--layer", "conv2", "--scorer", "patch", "--k", "2",
                          "--store", str(tmp_path / "s"), "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    s = json.loads(out.stdout)
    assert s["encoder"] == f"probe:{probe_world.id}" and s["passes"]["target_passes"] == 1
    assert "dissect probe-cnn" in out.stderr and "patches" in out.stderr and "images" in out.stderr


def test_cli_eval_on_a_missing_store_is_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "neurostore.cli", "eval", "--store", str(tmp_path / "nothing")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: No neurostore store at"), out.stderr
    assert not (tmp_path / "nothing").exists()


def test_concept_neurons_ranks_by_confidence_across_scorers(demo_run):
    """Raw scores of different scorers are on different scales; the ranking uses confidence."""
    summary, store = demo_run
    rows = store.query("concept_neurons", {"concept": summary["world"]["config"]["cue_kind"], "top": 50}).to_pylist()
    conf = [r["confidence"] for r in rows]
    assert rows and conf == sorted(conf, reverse=True)


def test_max_images_limits_the_probe_set(probe_world, tmp_path):
    store = Store.open(tmp_path / "s")
    kw = dict(world=probe_world, layers=["conv2"], scorers=["patch"], k=3, progress=False,
              log=lambda *a: None, evaluate=False)
    s = dissect(store, f"probe:cnn@{probe_world.root}", max_images=20, **kw)
    assert s["images"] == 20
    params = store.sql("SELECT params FROM runs WHERE run_id = $r", {"r": s["run_id"]})["params"][0].as_py()
    assert '"max_images": 20' in params
    with pytest.raises(BadParameter, match="max_images=0 must be at least 1") as e:
        dissect(store, f"probe:cnn@{probe_world.root}", max_images=0, **kw)
    # an empty list of layers is refused before a store is made (it ran every default layer)
    with pytest.raises(BadParameter, match=r"layers=\[\] is empty"):
        dissect(tmp_path / "none", f"probe:cnn@{probe_world.root}", max_images=20, **{**kw, "layers": []})
    assert not (tmp_path / "none").exists()
    assert cli_message(e.value) == "--max-images 0 must be at least 1."  # the CLI names its flag
    for arg, flag in (("k", "--k"), ("top_n", "--top"), ("batch_size", "--batch-size")):
        with pytest.raises(BadParameter, match=f"{arg}=0 must be at least 1") as e:
            dissect(store, f"probe:cnn@{probe_world.root}", **{**kw, arg: 0})
        assert cli_message(e.value) == f"{flag} 0 must be at least 1."


def test_warm_rerun_reuses_stored_patches_and_their_thumbnails(probe_world, tmp_path, monkeypatch):
    """The second run cuts the same patches but neither encodes nor re-thumbnails them; its
    per-unit summaries still get every thumbnail (read back from the store)."""
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    store = Store.open(tmp_path / "s")
    kw = dict(world=probe_world, layers=["conv2"], scorers=["patch"], k=3, max_images=40, progress=False,
              log=lambda *a: None, evaluate=False, summarise_with="patch")
    first = dissect(store, f"probe:cnn@{probe_world.root}", **kw)
    expl = store.sql("SELECT unit, summary FROM explanations ORDER BY unit").to_pylist()
    again = dissect(store, f"probe:cnn@{probe_world.root}", **kw)
    assert first["passes"]["encoded_crops"] > 0 and again["passes"]["encoded_crops"] == 0
    assert "patches" not in again["rows"]
    assert store.sql("SELECT unit, summary FROM explanations ORDER BY unit").to_pylist() == expl


def _tables(store: Store) -> dict:
    """Every table's rows but the runs' (run ids differ), in a fixed order."""
    out = {}
    for t in store.tables():
        if t != "runs":
            cols = ", ".join(f'"{c}"' for c, *_ in store.schema(t) if c != "run_id")
            out[t] = store.sql(f'SELECT {cols} FROM "{t}" ORDER BY ALL').to_pylist()
    return out


def test_warm_dissect_cuts_no_crop_again_and_writes_the_tables_of_a_cold_one(probe_world, tmp_path):
    """The same dissect again finds every box in the store's crops table (by image content): it
    decodes no image for its patches and encodes nothing, and the store ends exactly as the cold
    run left it."""
    store = Store.open(tmp_path / "s")
    kw = dict(world=probe_world, layers=["conv2"], scorers=["patch", "cos_cubed"], k=3, max_images=40,
              progress=False, log=lambda *a: None, evaluate=False)
    cold = dissect(store, f"probe:cnn@{probe_world.root}", **kw)
    assert cold["passes"]["decoded_for_crops"] > 0
    crops = store.sql("SELECT count(*) AS n, count(DISTINCT (image_hash, x0, y0, x1, y1)) AS k FROM crops").to_pylist()[0]
    assert crops["n"] == crops["k"] > 0
    before = _tables(store)
    warm = dissect(store, f"probe:cnn@{probe_world.root}", **kw)
    p = warm["passes"]
    assert p["decoded_for_crops"] == p["encoded_crops"] == p["encoded_images"] == p["encoded_texts"] == 0
    assert warm["patches"] == cold["patches"] and warm["patch_boxes"] == cold["patch_boxes"]
    assert "crops" not in warm["rows"] and "patches" not in warm["rows"]
    assert _tables(store) == before


def test_a_changed_image_file_gets_its_crops_cut_anew(probe_world, tmp_path):
    """Crops are keyed by the file's content, never its name: an image overwritten under the same
    name is decoded and cut again, and the run's patches are those of a cold run on the new files."""
    import shutil

    paths = probe_world.images().column("path").to_pylist()
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(4):
        shutil.copy(paths[i], folder / f"{i:02d}.png")
    kw = dict(layers=["conv2"], scorers=["patch"], k=3, progress=False, log=lambda *a: None)
    spec = f"probe:cnn@{probe_world.root}"
    store = Store.open(tmp_path / "s")
    dissect(store, spec, images=folder, **kw)
    shutil.copy(paths[5], folder / "00.png")                     # same name, other content
    warm = dissect(store, spec, images=folder, **kw)
    cold = Store.open(tmp_path / "cold")
    first = dissect(cold, spec, images=folder, **kw)
    # the changed image (and any unchanged one with a box never cut before) is decoded again
    assert 1 <= warm["passes"]["decoded_for_crops"] < first["passes"]["decoded_for_crops"] == 4
    q = "SELECT layer, unit, rank, image_id, patch_id FROM activations WHERE run_id = $r ORDER BY ALL"
    assert store.sql(q, {"r": warm["run_id"]}).to_pylist() == cold.sql(q, {"r": first["run_id"]}).to_pylist()


def test_top_images_runs_when_named_and_its_stored_scores_are_reproduced(probe_world, tmp_path):
    """The opt-in top_images scorer is not in a default dissect; named, it is scored from the
    pass's per-image maxima with its own null, takes part in the headline, and trust.assess
    recomputes its stored scores from the store's pooled rows."""
    from neurostore import trust

    assert "top_images" not in DEFAULT_SCORERS
    store = Store.open(tmp_path / "s")
    d = dissect(store, f"probe:cnn@{probe_world.root}", world=probe_world, layers=["conv3"],
                scorers=["patch", "top_images"], k=3, max_images=60, progress=False, log=lambda *a: None,
                evaluate=False)
    r = store.sql("SELECT count(DISTINCT unit) AS n, min(confidence) AS lo, max(confidence) AS hi FROM scores "
                  "WHERE scorer = 'top_images'").to_pylist()[0]
    assert r["n"] == d["units"] and 0 <= r["lo"] <= r["hi"] <= 1
    params = store.df("SELECT params FROM runs WHERE command = 'dissect'")["params"].iloc[0]
    assert '"top_images": {"top_k": 50}' in params and '"conv3": {"patch"' in params
    heads = store.df("SELECT candidates FROM headlines")
    assert len(heads) == d["units"] and (heads["candidates"] > 3).all()   # both scorers' top 3
    out = trust.assess(store, null_units=32, log=lambda *a: None)
    assert out["probe-cnn"]["probe"]["recomputed_max_diff"] < 1e-2


def test_encoder_iou_runs_when_named_with_its_null_and_in_the_headline(probe_world, tmp_path, monkeypatch):
    """The opt-in encoder_iou scorer: not in a default dissect; named, its pseudo-masks come from
    28 windows per image through the encoder (counted: 16 centred, 12 border ones shifted
    inside), it is scored with its own streamed null (stored with the run), its top 3 are
    headline candidates, and trust.assess keeps its null. The windows reach the store from
    their spill file a chunk at a time (here 500 of the 1,680 rows per write)."""
    from neurostore import pipeline, trust

    monkeypatch.setattr(pipeline, "EMBEDDING_CHUNK", 500)
    assert "encoder_iou" not in DEFAULT_SCORERS
    store = Store.open(tmp_path / "s")
    d = dissect(store, f"probe:cnn@{probe_world.root}", world=probe_world, layers=["conv3"],
                scorers=["top_images", "encoder_iou"], k=3, max_images=60, progress=False, log=lambda *a: None,
                evaluate=False)
    assert d["passes"]["encoded_cells"] == 60 * S.cell_windows(S.CELL_GRID)
    r = store.sql("SELECT count(DISTINCT unit) AS n, min(score) AS lo, max(score) AS hi, max(confidence) AS c "
                  "FROM scores WHERE scorer = 'encoder_iou'").to_pylist()[0]
    assert r["n"] == d["units"] and 0 <= r["lo"] <= r["hi"] <= 1 and 0 <= r["c"] <= 1
    params = json.loads(store.df("SELECT params FROM runs WHERE command = 'dissect'")["params"].iloc[0])
    null = params["nulls"]["conv3"]["encoder_iou"]
    assert null["scorer"] == "encoder_iou" and null["scale"] > 0
    heads = store.df("SELECT candidates FROM headlines")
    assert len(heads) == d["units"] and (heads["candidates"] > 3).all()
    out = trust.assess(store, null_units=32, log=lambda *a: None)
    assert out["probe-cnn"]["probe"]["nulls"]["conv3"]["encoder_iou"] == null
    # the windows are kept in the store by image content: the same images again (another layer
    # beside conv3 here) encode none, and conv3's scores come out the same from the stored ones
    n = store.sql("SELECT count(*) AS n FROM embeddings WHERE kind = 'cell'").to_pylist()[0]["n"]
    assert n == 60 * S.cell_windows(S.CELL_GRID)
    q = "SELECT unit, rank, concept, score FROM scores WHERE scorer = 'encoder_iou' AND layer = 'conv3' ORDER BY unit, rank"
    first = store.df(q)
    d2 = dissect(store, f"probe:cnn@{probe_world.root}", world=probe_world, layers=["conv2", "conv3"],
                 scorers=["top_images", "encoder_iou"], k=3, max_images=60, progress=False, log=lambda *a: None,
                 evaluate=False)
    assert d2["passes"]["encoded_cells"] == 0
    assert store.sql("SELECT count(*) AS n FROM embeddings WHERE kind = 'cell'").to_pylist()[0]["n"] == n
    second = store.df(q)
    assert len(first) and len(second) == len(first)
    assert (first[["unit", "rank", "concept"]] == second[["unit", "rank", "concept"]]).all().all()
    assert (first["score"] == second["score"]).all()   # the stored windows are the encoded ones, exactly
    # one pass finds one threshold per unit: iou and encoder_iou must share their top_fraction
    with pytest.raises(BadParameter, match="same top_fraction"):
        dissect(store, f"probe:cnn@{probe_world.root}", world=probe_world, layers=["conv3"],
                scorers=["iou", "encoder_iou"], scorer_params={"iou": {"top_fraction": 0.01}}, max_images=8,
                progress=False, log=lambda *a: None, evaluate=False)


def test_encoder_iou_window_cache_keys_carry_the_geometry(tmp_path):
    """A target that sees another part of the image (its centre crop) or another grid cuts other
    windows: their keys differ, so neither reuses the other's."""
    from neurostore.images import CellWindows
    from neurostore.pipeline import _CellCache

    store = Store.open(tmp_path / "s")
    keys = {_CellCache(store, "enc", CellWindows(None, g, cf)).ids("abc")[0]
            for g, cf in ((4, None), (4, 0.875), (8, None))}
    assert len(keys) == 3 and all(k.startswith("abc/") for k in keys)


def test_encoder_iou_windows_spill_to_disk_and_read_back_exactly(tmp_path):
    """This run's windows live in a temporary file, not in memory: the last batch is read as it
    was encoded, an image met batches ago (the same content twice) from the file, and the
    commit gets every window in order of encoding."""
    from neurostore.images import CellWindows
    from neurostore.pipeline import _CellCache

    cache = _CellCache(Store.open(tmp_path / "s"), "enc", CellWindows(None, 4, None))
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((3, cache.n, 8)).astype(np.float32) for _ in range(3)]
    for i, b in enumerate(batches):
        cache.add([f"h{i}{j}" for j in range(3)], b)
    assert len(cache.recent) == 3 and "h00" not in cache.recent
    got = cache.lookup(["h21", "h00", "h12"])
    assert np.array_equal(got, np.stack([batches[2][1], batches[0][0], batches[1][2]]))
    ids, m = cache.vectors()
    assert ids[:cache.n] == cache.ids("h00") and len(ids) == 9 * cache.n
    every = [i for h in cache.new for i in cache.ids(h)]
    assert [ids[a:a + 50] for a in range(0, len(ids), 50)] == [every[a:a + 50] for a in range(0, len(every), 50)]
    assert ids[len(ids) - 1] == ids[-1] == every[-1] and ids[cache.n] == every[cache.n]
    assert np.array_equal(np.asarray(m), np.concatenate(batches).reshape(-1, 8))


def test_encoder_iou_window_spill_resumes_only_what_its_index_names(tmp_path):
    """A spill beside a checkpoint: a second cache of the same work takes the images its index
    names (rows written after the last index are cut off); another encoder's index, or a
    damaged one, is not taken."""
    from neurostore.images import CellWindows
    from neurostore.pipeline import _CellCache

    store, spill = Store.open(tmp_path / "s"), tmp_path / "ck" / "dissect-x.windows"
    first = _CellCache(store, "enc", CellWindows(None, 4, None), spill=spill, every=1e9)
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((2, first.n, 8)).astype(np.float32) for _ in range(2))
    first.add(["a0", "a1"], a)
    first.save_index()
    first.add(["b0", "b1"], b)                     # not indexed: a kill here loses these
    first.spill.close()
    again = _CellCache(store, "enc", CellWindows(None, 4, None), spill=spill)
    assert list(again.new) == ["a0", "a1"] and spill.stat().st_size == a.nbytes
    assert np.array_equal(again.lookup(["a1", "a0"]), a[::-1])
    again.spill.close()
    other = _CellCache(store, "other-encoder", CellWindows(None, 4, None), spill=spill)
    assert not other.new and spill.stat().st_size == 0
    other.spill.close()
    (tmp_path / "ck" / "dissect-x.windows.json").write_text("{not json")
    assert not _CellCache(store, "enc", CellWindows(None, 4, None), spill=spill).new


def test_a_vocabulary_the_probe_world_never_draws_dissects_without_the_mask_scorers(probe_world, tmp_path):
    """No concept of the vocabulary in the world's masks: the mask metrics were an empty frame
    (a TypeError traceback) and iou's null had no units; now iou is left out with a note, or
    refused in one line when asked for by name."""
    words = tmp_path / "fruit.txt"
    words.write_text("apple\nbanana\ncar\nhouse\n")
    said = []
    kw = dict(world=probe_world, layers=["conv4"], k=3, max_images=20, progress=False, log=said.append,
              vocabulary=f"file:{words}")
    s = dissect(tmp_path / "s", f"probe:cnn@{probe_world.root}", **kw)
    assert "iou" not in s["scorers"] and any("iou left out" in m for m in said)
    with pytest.raises(BadInput, match="Scorer iou reads the probe world's masks, and vocabulary file:fruit has none"):
        dissect(tmp_path / "s", f"probe:cnn@{probe_world.root}", scorers=["patch", "iou"], **kw)
    # a scorer to summarise that the dissect does not run was ignored silently
    with pytest.raises(BadParameter, match="Unknown scorer to summarise 'patchh'. Did you mean patch") as e:
        dissect(tmp_path / "s", f"probe:cnn@{probe_world.root}", summarise_with="patchh", **kw)
    assert "--summarise names one of" in cli_message(e.value)


def test_a_dissect_of_fewer_images_of_a_folder_keeps_the_images_others_saw(probe_world, tmp_path):
    """Two dissects of one folder (the same dataset id) with different --max-images: the images
    and rejects rows of the first stay, so every activation still names a stored image."""
    import shutil

    paths = probe_world.images().column("path").to_pylist()
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(6):
        shutil.copy(paths[i], folder / f"{i:02d}.png")
    (folder / "00-notes.txt").write_text("not an image")
    kw = dict(scorers=["patch"], k=2, progress=False, log=lambda *a: None)
    spec = f"probe:cnn@{probe_world.root}"
    store = Store.open(tmp_path / "s")
    dissect(store, spec, images=folder, layers=["conv2"], **kw)
    dissect(store, spec, images=folder, layers=["conv3"], max_images=3, **kw)
    ids = store.sql("SELECT image_id FROM images ORDER BY image_id")["image_id"].to_pylist()
    assert ids == [f"{i:02d}.png" for i in range(6)]
    assert store.sql("SELECT count(*) AS n FROM rejects")["n"].to_pylist() == [1]
    orphans = store.sql("SELECT count(*) AS n FROM activations a ANTI JOIN images i USING (dataset, image_id)")
    assert orphans["n"].to_pylist() == [0]


def test_a_folder_of_only_bad_files_says_why_and_leaves_no_checkpoint(probe_world, tmp_path):
    from PIL import Image

    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image")
    said = []
    with pytest.raises(BadInput, match=r"all 2 files were rejected \(notes.txt: not an image; zero.jpg: zero bytes\)"):
        dissect(tmp_path / "s", f"probe:cnn@{probe_world.root}", images=folder, layers=["conv2"], progress=False,
                log=said.append)
    assert not any("saving the image pass" in line for line in said)
    Image.new("RGB", (64, 64), (200, 10, 10)).save(folder / "one.png")
    with pytest.raises(BadInput, match=r"Only one usable image in .* \(2 files rejected\): a dissect compares"):
        dissect(tmp_path / "s", f"probe:cnn@{probe_world.root}", images=folder, layers=["conv2"], progress=False,
                log=said.append)   # was 'the cos_cubed null has 0 usable pseudo-units'
    ckpt = tmp_path / "s" / "checkpoints"
    assert not ckpt.exists() or not any(ckpt.iterdir())

"""The web app over HTTP: pages, JSON twins, patch images, search, console refusals, deadline."""

import json
import re
import urllib.error
import urllib.parse
import urllib.request

import duckdb
import pytest

from _webstore import shared_server, shared_store
from neurostore.web import data as D


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    return shared_server(tmp_path_factory)


def get(server, path, method="GET"):
    req = urllib.request.Request(server.url.rstrip("/") + path, method=method)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read()


def get_json(server, path):
    status, ctype, body = get(server, path)
    assert ctype.startswith("application/json"), (path, ctype)
    return status, json.loads(body)


def sql_path(sql, json_=False, **params):
    return "/sql" + (".json" if json_ else "") + "?" + urllib.parse.urlencode({"q": sql, **params})


def test_binds_localhost_by_default(server):
    assert server.server_address[0] == "127.0.0.1"


def test_index_lists_models_and_layers(server):
    status, ctype, body = get(server, "/")
    html = body.decode()
    assert status == 200 and ctype.startswith("text/html")
    for name in ("toy-cnn", "toy-vit", "layer1.0.conv2", "blocks.1.mlp.fc1"):
        assert name in html
    status, data = get_json(server, "/index.json")
    assert [m["model"] for m in data["models"]] == ["toy-cnn", "toy-vit"]
    cnn = data["models"][0]
    assert [l["layer"] for l in cnn["layers"]] == ["conv1", "layer1.0.conv2", "fc"]  # depth order
    assert cnn["layers"][0]["n_scored"] == 6 and cnn["layers"][0]["scorers"] == ["iou", "patch"]


def test_model_and_layer_pages_show_the_depth_plot(server):
    status, _, body = get(server, "/model/toy-cnn")
    assert status == 200 and b"<svg" in body and b"Concepts by depth" in body
    status, data = get_json(server, "/model/toy-cnn.json")
    prof = data["profile"]
    assert prof["by"] == "category" and prof["layers"] == ["conv1", "layer1.0.conv2", "fc"]
    # The fixture's truth: colour early, texture middle, shape late.
    assert prof["series"]["colour"] == [1.0, 0.0, 0.0]
    assert prof["series"]["shape"] == [0.0, 0.0, 1.0]
    status, _, body = get(server, "/layer/toy-cnn/layer1.0.conv2")
    html = body.decode()
    assert status == 200 and html.count('href="/neuron/toy-cnn/layer1.0.conv2/') >= 6
    assert 'class="tick hl"' in html  # this layer highlighted in the plot
    status, data = get_json(server, "/layer/toy-cnn/layer1.0.conv2.json")
    assert len(data["units"]) == 6 and data["units"][0]["top_patch"]


def test_neuron_card_has_patches_concepts_summary_histogram(server, tmp_path_factory):
    _, info = shared_store(tmp_path_factory)
    status, _, body = get(server, "/neuron/toy-cnn/conv1/0")
    html = body.decode()
    assert status == 200
    imgs = re.findall(r'<img[^>]+src="(/patch/[0-9a-f]+\.png)"', html)
    assert len(imgs) == 6
    assert "Fires on red things" in html           # the LLM summary
    assert "act <b>" in html and "Activation histogram" in html
    for scorer in ("patch", "iou"):
        assert f"<h3 class=\"first\">{scorer}" in html
    status, card = get_json(server, "/neuron/toy-cnn/conv1/0.json")
    assert card["id"] == "toy-cnn/conv1/0"
    assert [p["rank"] for p in card["patches"]] == list(range(6))
    assert all(p["image_label"] for p in card["patches"])
    values = [p["act_value"] for p in card["patches"]]
    assert values == sorted(values, reverse=True)
    best = {s["scorer"]: s["concepts"][0]["concept"] for s in card["scorers"]}
    assert best == {"patch": info["truth"][("toy-cnn", "conv1", 0)], "iou": info["truth"][("toy-cnn", "conv1", 0)]}
    assert len(card["stats"]["hist_counts"]) == len(card["stats"]["hist_edges"]) - 1
    # Every patch image the page references is served as a PNG.
    for src in imgs:
        status, ctype, png = get(server, src)
        assert status == 200 and ctype == "image/png" and png[:8] == b"\x89PNG\r\n\x1a\n"


def test_fc_card_shows_effects(server):
    status, card = get_json(server, "/neuron/toy-cnn/fc/1.json")
    assert card["effects"][0]["class"] == "square" and card["effects"][0]["value"] == pytest.approx(-0.3)


@pytest.mark.parametrize("path,status", [
    ("/neuron/toy-cnn/conv1/99", 404), ("/layer/toy-cnn/conv9", 404), ("/model/resnet", 404),
    ("/nowhere", 404), ("/patch/deadbeef.png", 404), ("/patch/..%2F..%2Fetc%2Fpasswd.png", 404),
])
def test_missing_things_are_404_with_a_message(server, path, status):
    got, _, body = get(server, path)
    assert got == status
    if path.startswith("/layer"):
        assert b"Did you mean" in body or b"Valid:" in body


def test_read_only_methods(server):
    assert get(server, "/sql?q=SELECT+1", method="POST")[0] == 405
    assert get(server, "/", method="HEAD")[0] == 200


def test_search_exact(server):
    status, data = get_json(server, "/search.json?q=striped&mode=exact")
    assert status == 200 and data["units"]
    assert {u["concept"] for u in data["units"]} == {"striped"}
    # Most confident first: the units whose best concept is 'striped' (fixture: middle layer, units 0 and 3).
    assert {(u["layer"], u["unit"]) for u in data["units"][:4]} == {("layer1.0.conv2", 0), ("layer1.0.conv2", 3)}
    confs = [u["confidence"] for u in data["units"]]
    assert confs == sorted(confs, reverse=True)
    status, data = get_json(server, "/search.json?q=stripd&mode=exact")
    assert data["units"] == [] and "striped" in data["did_you_mean"]
    status, _, body = get(server, "/search?q=striped&mode=exact")
    assert b'href="/neuron/toy-cnn/layer1.0.conv2/' in body


def test_search_semantic_finds_related_concepts(server):
    status, data = get_json(server, "/search.json?q=zebra+stripes&mode=semantic")
    assert status == 200
    assert data["concepts"][0]["concept"] == "striped"
    assert data["concepts"][0]["units"]


def test_search_open_vocabulary_reports_missing_patch_embeddings(server):
    status, data = get_json(server, "/search.json?q=red+circle&mode=open")
    assert status == 200 and data["units"] == [] and "patch embeddings" in data["note"]


def test_search_bad_mode(server):
    status, data = get_json(server, "/search.json?q=x&mode=fuzzy")
    assert "Unknown search mode 'fuzzy'" in data["error"]


def test_console_html_and_json(server):
    status, _, body = get(server, sql_path("SELECT concept, count(*) AS n FROM scores WHERE rank = 0 GROUP BY concept ORDER BY n DESC"))
    assert status == 200 and b"<table>" in body and b"red" in body
    status, data = get_json(server, sql_path("SELECT unit, concept FROM scores WHERE model = $m AND layer = $l AND rank = 0 ORDER BY unit",
                                             True, m="toy-cnn", l="conv1"))
    assert status == 200 and data["ok"] is True
    assert data["result"]["columns"] == ["unit", "concept"]
    assert data["result"]["rows"][0] == [0, "red"]
    assert data["result"]["truncated"] is False


def test_console_html_links_neurons(server):
    status, _, body = get(server, sql_path("SELECT model, layer, unit FROM scores WHERE rank = 0 ORDER BY ALL LIMIT 2"))
    assert status == 200 and body.count(b'href="/neuron/toy-cnn/conv1/') == 2


def test_console_truncates_at_the_row_cap(server):
    status, data = get_json(server, sql_path("SELECT * FROM range(5000)", True))
    assert data["result"]["truncated"] is True and data["result"]["row_count"] == 1000


@pytest.mark.parametrize("sql", [
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM read_parquet('/etc/hostname')",
    "COPY scores TO '/tmp/neurostore-web-test-leak.csv'",
    "ATTACH '/tmp/neurostore-web-test-leak.duckdb'",
    "INSTALL httpfs", "LOAD httpfs",
    "SET enable_external_access = true",
    "PRAGMA version",
    "CREATE TABLE x AS SELECT 1", "DROP TABLE scores", "INSERT INTO models (model) VALUES ('x')",
    "SELECT 1; SELECT 2",
])
def test_console_refusals_over_http(server, sql):
    import os

    status, data = get_json(server, sql_path(sql, True))
    assert status == 400 and data["ok"] is False and data["error_type"] == "refused"
    assert "root:" not in json.dumps(data)
    status, _, body = get(server, sql_path(sql))
    assert status == 400 and b'class="error"' in body
    assert not os.path.exists("/tmp/neurostore-web-test-leak.csv")
    assert not os.path.exists("/tmp/neurostore-web-test-leak.duckdb")


def test_console_stops_a_slow_query(server):
    status, data = get_json(server, sql_path("SELECT count(*) FROM range(1000000000) a, range(1000000000) b", True))
    assert status == 400 and data["error_type"] == "timeout" and "time limit" in data["error"]


def test_named_queries(server):
    status, _, body = get(server, "/query/concept_neurons")
    assert status == 200 and b'name="concept"' in body
    status, data = get_json(server, "/query/concept_neurons.json?concept=dotted&top=4")
    assert status == 200 and data["result"]["row_count"] == 4
    status, data = get_json(server, "/query/nope.json")
    assert status == 400 and "Unknown query 'nope'" in data["error"]


def test_tables_page_and_findings_placeholders(server):
    status, _, body = get(server, "/tables")
    assert status == 200 and b"scores" in body
    for kind, cmd in (("audit", b"neurostore audit"), ("compare", b"neurostore compare")):
        status, _, body = get(server, f"/{kind}")
        assert status == 200 and b"No findings yet" in body and cmd in body


def test_findings_render_any_audit_or_comparison_table():
    con = duckdb.connect()
    con.execute("CREATE TABLE audit_findings AS SELECT 'toy-cnn' AS model, 'fc' AS layer, 1 AS unit, "
                "'star' AS class, 'watermark' AS concept, 0.8 AS score")
    con.execute("CREATE TABLE comparisons AS SELECT 'toy-cnn' AS model_a, 'toy-vit' AS model_b, 0.5 AS overlap")
    con.execute("CREATE TABLE unrelated AS SELECT 1 AS x")

    def run(sql, params=None):
        return con.sql(sql, params=params).to_arrow_table()

    audit = D.findings(run, "audit")
    assert [t["table"] for t in audit["tables"]] == ["audit_findings"] and not audit["empty"]
    from neurostore.web.render import Links, render

    html = render("findings.html", audit, Links())
    assert 'href="/neuron/toy-cnn/fc/1"' in html and "watermark" in html
    assert [t["table"] for t in D.findings(run, "compare")["tables"]] == ["comparisons"]


def test_store_files_untouched(server, tmp_path_factory):
    path, _ = shared_store(tmp_path_factory)
    before = sorted((p.relative_to(path), p.stat().st_mtime_ns) for p in path.rglob("*") if p.is_file())
    get(server, "/neuron/toy-cnn/conv1/1")
    get(server, sql_path("SELECT * FROM scores LIMIT 5"))
    after = sorted((p.relative_to(path), p.stat().st_mtime_ns) for p in path.rglob("*") if p.is_file())
    assert before == after


def test_console_downloads_csv_and_parquet(server):
    import io

    import pyarrow.parquet as pq

    q = {"q": "SELECT patch_id, thumbnail, x0 FROM patches ORDER BY patch_id LIMIT 3"}
    status, ctype, body = get(server, "/sql.csv?" + urllib.parse.urlencode(q))
    lines = body.decode().splitlines()
    assert status == 200 and ctype.startswith("text/csv") and lines[0] == '"patch_id","thumbnail","x0"'
    assert len(lines) == 4 and '$base64' in lines[1]  # bytes as their JSON text
    status, ctype, body = get(server, "/sql.parquet?" + urllib.parse.urlencode(q))
    t = pq.read_table(io.BytesIO(body))
    assert status == 200 and t.num_rows == 3 and t.column("thumbnail")[0].as_py()[:4] == b"\x89PNG"
    status, _, body = get(server, "/sql.csv?" + urllib.parse.urlencode({"q": "COPY scores TO '/tmp/x.csv'"}))
    assert status == 400 and body.startswith(b"Error: ") and body.count(b"\n") == 1


def test_search_merges_every_mode_by_default(server):
    status, data = get_json(server, "/search.json?q=striped")
    assert data["mode"] == "all" and data["counts"]["exact"] > 0
    modes = [u["found_by"] for u in data["units"]]
    assert modes == sorted(modes, key=D.FOUND_BY.index)  # exact, then semantic, then open
    keys = [(u["model"], u["layer"], u["unit"]) for u in data["units"]]
    assert len(keys) == len(set(keys))
    exact = [u["confidence"] for u in data["units"] if u["found_by"] == "exact"]
    assert exact == sorted(exact, reverse=True)


def test_card_leads_with_the_headline(server):
    from neurostore.web.render import Links, render

    status, card = get_json(server, "/neuron/toy-cnn/conv1/2.json")
    assert card["prev"] == 1 and card["next"] == 3
    card["headline"] = {"concept": "vermilion", "scorer": "patch", "confidence": 0.42, "fidelity": 0.61,
                        "auprc": 0.7, "candidates": 9, "vocabulary": "probe", "runner_up": "scarlet",
                        "runner_up_scorer": "encoder_iou", "runner_up_confidence": 0.3}
    html = render("neuron.html", card, Links())
    assert html.index("vermilion") < html.index("scarlet") < html.index("Top images") < html.index("Concepts per scorer")
    assert "by encoder_iou" in html
    card["headline"].update(runner_up=None, runner_up_scorer=None, runner_up_confidence=None)
    assert "runner-up" not in render("neuron.html", card, Links())
    assert 'width="29.4"' in html  # the 0.42 bar: 42% of 70 px, as an SVG attribute (CSP allows it)
    assert 'rel="prev"' in html and 'href="/neuron/toy-cnn/conv1/3"' in html


def test_audit_page_leads_with_the_verdict_per_class():
    from neurostore.web.render import Links, render

    con = duckdb.connect()
    con.execute("""CREATE TABLE audit_units AS SELECT * FROM (VALUES
        ('m', 'star', 0, 'fc', 1, 0.5, NULL::FLOAT, 0.4, -0.2, 'watermark', 0.9, 0.1, 0.3, true, 'patch', 10, 'd', 'r'),
        ('m', 'circle', 0, 'fc', 2, 0.4, NULL, 0.3, -0.1, 'circle', 0.9, 0.9, 0.3, false, 'patch', 10, 'd', 'r'))
        t(model, class, rank, layer, unit, grad_x_act, weight_x_act, share, ablation_effect, label, label_confidence,
          relatedness, threshold, flagged, scorer, n_images, dataset, run_id)""")
    con.execute("""CREATE TABLE audit_findings AS SELECT 'm' AS model, 'star' AS class, 'watermark' AS concept, 0 AS rank,
        ['fc/1'] AS neurons, 1 AS n_units, 0.5 AS contribution, 0.1 AS relatedness, 0.62 AS cue_flip_before,
        0.05 AS cue_flip_after, 0.57 AS reliance_drop, 0.9 AS accuracy_before, 0.88 AS accuracy_after,
        true AS verified, true AS headline, NULL AS cued_accuracy_before""")

    def run(sql, params=None):
        return con.sql(sql, params=params).to_arrow_table()

    data = D.findings(run, "audit")
    assert [(v["class"], v["verdict"]) for v in data["verdicts"]] == [
        ("star", "relies on a spurious concept"), ("circle", "no spurious concept found")]
    html = render("findings.html", data, Links())
    assert html.index("Verdict per class") < html.index("Evidence") < html.index("<code>audit_findings</code>")
    assert "62% → 5%" in html and "cued accuracy before" not in html  # the main columns only
    assert "NULL" not in html
    # a ViT's finding removed as a residual-stream direction says so, not "zeroing 0 units"
    con.execute("""CREATE OR REPLACE TABLE audit_findings AS SELECT *, 'direction' AS ablation,
        'blocks.3' AS direction_layer FROM audit_findings""")
    con.execute("UPDATE audit_findings SET n_units = 0, neurons = []")
    html = render("findings.html", D.findings(run, "audit"), Links())
    assert "a direction of the residual stream after <code>blocks.3</code> · projecting it out moves the cue flip rate 62% → 5%" in html
    assert "zeroing them" not in html


def test_values_print_as_people_read_them(server):
    status, _, body = get(server, sql_path("SELECT INTERVAL 1141 SECOND AS took, NULL AS nothing, true AS ok"))
    table = body.decode().split("Download:")[1].split("</thead>")[1].split("</table>")[0]
    assert status == 200 and "19 min 1 s" in table and "MonthDayNano" not in table and "NULL" not in table
    assert ">yes<" in table
    import datetime as dt

    import pyarrow as pa

    from neurostore.web.render import human, people

    interval = pa.array([pa.MonthDayNano([0, 0, 1_141_000_000_000])], pa.month_day_nano_interval())[0].as_py()
    assert people(interval) == "19 min 1 s" and people(dt.timedelta(seconds=1.28)) == "1.28 s"
    assert people(dt.datetime(2026, 1, 2, 3, 4, 5, 678)) == "2026-01-02 03:04:05"
    assert human("best_patch") == "top patch" and human("depth_frac") == "depth"


def test_card_shows_the_circuit_of_its_group():
    from neurostore.web.render import Links, render

    con = duckdb.connect()
    con.execute("""CREATE TABLE groups AS SELECT * FROM (VALUES ('m', 'l1', 0, [3, 5], 2, 'red'), ('m', 'l2', 0, [1], 1, 'star'),
        ('m', 'l0', 1, [0], 1, 'edge')) t(model, layer, group_id, units, n_units, label)""")
    con.execute("""CREATE TABLE group_edges AS SELECT * FROM (VALUES
        ('m', 'group', 'l0', 1, 'l1', 0, NULL, 0.2::FLOAT), ('m', 'group', 'l1', 0, 'l2', 0, NULL, 0.7),
        ('m', 'class', 'l1', 0, NULL, NULL, 'star', 1.5), ('m', 'group', 'l1', 9, 'l2', 0, NULL, 9.0))
        t(model, kind, src_layer, src_group, dst_layer, dst_group, class, weight)""")

    def run(sql, params=None):
        return con.sql(sql, params=params).to_arrow_table()

    cards = {u: {"unit": u} for u in (3, 4, 5)}
    D.circuit(run, "m", "l1", cards)
    g = cards[5]["group"]
    assert "group" not in cards[4] and cards[3]["group"] == g
    assert [(e["src_layer"], e["src_group"], e["src_label"]) for e in g["fed_by"]] == [("l0", 1, "edge")]
    assert [(e["dst_layer"], e["dst_label"], e["weight"]) for e in g["feeds"]] == [("l2", "star", pytest.approx(0.7))]
    assert [e["class"] for e in g["classes"]] == ["star"]
    card = {"id": "m/l1/5", "model": "m", "layer": "l1", "unit": 5, "patches": [], "scorers": [], "summaries": [],
            "effects": [], "classes": [], "stats": None, "headline": None, "prev": 4, "next": None, "group": g}
    html = render("neuron.html", card, Links())
    html = html[html.index("Circuit"):]  # the wiring card above names 'fed by' / 'feeds' too
    assert html.index("fed by") < html.index("l0 group 1") < html.index("feeds") < html.index("class <b>star</b>")


def test_card_shows_the_units_it_feeds_and_is_fed_by_and_the_classes_it_pushes():
    """unit_edges -> the card's wiring: each side strongest |weight| first with the other unit's
    headline label (else its explanation), a link to its card, a signed bar; no edges -> the command."""
    from neurostore.web.render import Links, render

    con = duckdb.connect()
    con.execute("""CREATE TABLE unit_edges AS SELECT * FROM (VALUES
        ('m', 'unit', 'l0', 2, 'l1', 5, NULL, 0.30::FLOAT, 64), ('m', 'unit', 'l0', 7, 'l1', 5, NULL, -0.90, 64),
        ('m', 'unit', 'l1', 5, 'l2', 1, NULL, 0.05, 64), ('m', 'unit', 'l1', 4, 'l2', 1, NULL, 8.0, 64),
        ('m', 'class', 'l1', 5, NULL, NULL, 'star', 1.5, 100), ('m', 'class', 'l1', 5, NULL, NULL, 'circle', -0.4, 90))
        t(model, kind, src_layer, src_unit, dst_layer, dst_unit, class, weight, n_images)""")
    con.execute("CREATE TABLE headlines AS SELECT 'm' AS model, 'l0' AS layer, 7 AS unit, 'stripes' AS concept")
    con.execute("""CREATE TABLE explanations AS SELECT * FROM (VALUES ('m', 'l0', 7, 'red', 0.9), ('m', 'l2', 1, 'star', 0.8),
        ('m', 'l2', 1, 'dot', 0.1)) t(model, layer, unit, label, confidence)""")

    def run(sql, params=None):
        return con.sql(sql, params=params).to_arrow_table()

    cards = {u: {"unit": u} for u in (4, 5, 6)}
    D.wiring(run, "m", "l1", cards)
    w = cards[5]["wiring"]
    assert [(e["other_layer"], e["other_unit"], e["label"], e["weight"]) for e in w["fed_by"]] == [
        ("l0", 7, "stripes", pytest.approx(-0.9)), ("l0", 2, None, pytest.approx(0.3))]
    assert [(e["other_unit"], e["label"]) for e in w["feeds"]] == [(1, "star")]
    assert [e["class"] for e in w["classes"]] == ["star", "circle"] and w["n_images"] == 64
    assert [e["scale"] for e in w["fed_by"]] == pytest.approx([1.0, 1 / 3])
    assert w["layers"] == {"fed_by": "l0", "feeds": "l2"}
    assert cards[6]["wiring"] == {"fed_by": [], "feeds": [], "classes": [], "n_images": None, "layers": w["layers"],
                                  "covered": True}
    card = {"id": "m/l1/5", "model": "m", "layer": "l1", "unit": 5, "patches": [], "scorers": [], "summaries": [],
            "effects": [], "classes": [], "stats": None, "headline": None, "prev": 4, "next": None, "wiring": w}
    html = render("neuron.html", card, Links())
    assert (html.index("Fed by") < html.index('href="/neuron/m/l0/7"') < html.index("“stripes”") < html.index("Feeds")
            < html.index('href="/neuron/m/l2/1"') < html.index("Classes it pushes") < html.index("</b> star <") < html.index("</b> circle <"))
    bars = re.findall(r'<rect class="(pos|neg)" x="([\d.]+)" y="1" width="([\d.]+)"', html)
    assert bars == [("neg", "1.0", "44.0"), ("pos", "45", "14.7"), ("pos", "45", "44.0"), ("pos", "45", "44.0"),
                    ("neg", "33.3", "11.7")]
    assert "style=" not in html.split('class="card wiring"')[1].split("</div>\n</div>")[0]
    card["wiring"] = None  # a model without edges: the card names the command that computes them
    card["dissected"] = True   # (a model only imported cannot be grouped)
    assert "run <code>neurostore groups m</code>" in render("neuron.html", card, Links())
    fc = {0: {"unit": 0}}
    D.wiring(run, "m", "fc", fc)  # a layer groups left out (logits): said so, not 'run groups'
    assert fc[0]["wiring"]["covered"] is False
    html = render("neuron.html", {**card, "id": "m/fc/0", "layer": "fc", "unit": 0, "wiring": fc[0]["wiring"]}, Links())
    assert "No attribution edges for fc" in html and "Fed by" not in html


def test_quantile_examples_span_the_activation_range(tmp_path):
    from PIL import Image

    con = duckdb.connect()
    paths = []
    for i in range(20):
        Image.new("RGB", (8, 8), (i * 10, 0, 0)).save(tmp_path / f"{i}.png")
        paths.append(("d", f"{i:02d}", str(tmp_path / f"{i}.png") if i != 19 else "/nonexistent"))
    con.execute("CREATE TABLE images (dataset VARCHAR, image_id VARCHAR, path VARCHAR, label VARCHAR)")
    con.executemany("INSERT INTO images VALUES (?, ?, ?, 'x')", paths)
    # unit 1's activation on image i is i (unit 0's is -i): bands of 4 images each, highest first
    con.execute("CREATE TABLE pooled AS SELECT 'm' AS model, 'l' AS layer, 'd' AS dataset, "
                "lpad(i::VARCHAR, 2, '0') AS image_id, [-i::FLOAT, i::FLOAT] AS act_max FROM range(20) t(i)")

    def run(sql, params=None):
        return con.sql(sql, params=params).to_arrow_table()

    q = D.quantile_examples(run, "m", "l", [1], bands=5, per_band=2)[1]
    assert [b["band"] for b in q] == [5, 4, 3, 2, 1]
    assert [(b["lo"], b["hi"]) for b in q] == [(16, 19), (12, 15), (8, 11), (4, 7), (0, 3)]
    for b in q:
        assert len(b["images"]) <= 2 and all(b["lo"] <= i["act"] <= b["hi"] for i in b["images"])
    assert "19" not in [i["image_id"] for b in q for i in b["images"]]  # its file is gone: left out


def _png_pixels(body):  # any format PIL reads
    import io

    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(body)).convert("RGB")).astype(float)  # [H, W, 3]


def test_card_draws_the_activation_map_over_each_top_image(server):
    """Conv units carry a map per top image (the fixture's blob peaks at grid cell (3, 4)): the
    card draws each as a heatmap JPEG over the image, hottest where the map peaks; a linear unit
    (1x1 map) keeps the image and box alone."""
    status, _, body = get(server, "/neuron/toy-cnn/conv1/0")
    html = body.decode()
    heat = re.findall(r'<image class="heat" href="(/heatmap/toy-cnn/conv1/0/(\d+)\.jpg)"', html)
    assert [int(r) for _, r in heat] == list(range(6)) and "heatmap: the unit" in html
    status, ctype, jpeg = get(server, heat[0][0])
    assert status == 200 and ctype == "image/jpeg" and jpeg[:3] == b"\xff\xd8\xff"
    px = _png_pixels(jpeg)
    assert px.shape[:2] == (192, 192) and px.std() > 20
    # Heat is yellow (high R and G): the peak's region (rows 3-4 of 8, columns 4-5) against a corner.
    warm = (px[..., 0] + px[..., 1]) / 2 - px[..., 2]
    assert warm[72:120, 96:144].mean() > warm[:24, :24].mean() + 40
    status, _, body = get(server, "/neuron/toy-cnn/fc/0")
    assert status == 200 and b'class="heat"' not in body and b'class="box"' in body
    assert get(server, "/heatmap/toy-cnn/fc/0/0.jpg")[0] == 404
    assert get(server, "/heatmap/toy-cnn/conv1/0/99.jpg")[0] == 404


def test_card_links_the_co_activated_units_of_adjacent_layers(server):
    """The fixture's units follow one signal with sign (-1)^unit: conv1 unit 0 correlates +1 with
    even units of layer1.0.conv2 and -1 with odd ones; the first layer is fed by nothing recorded."""
    status, card = get_json(server, "/neuron/toy-cnn/layer1.0.conv2/0.json")
    fed, feeds = card["links"]["fed_by"], card["links"]["feeds"]
    assert fed["layer"] == "conv1" and feeds["layer"] == "fc" and fed["n_images"] == 24
    assert len(fed["units"]) == 5 and all(abs(v["r"]) > 0.95 for v in fed["units"])
    assert all((v["r"] > 0) == (v["unit"] % 2 == 0) for v in fed["units"] + feeds["units"])
    html = get(server, "/neuron/toy-cnn/layer1.0.conv2/0")[2].decode()
    assert "co-activation (Pearson r over 24 probe images)" in html
    assert html.count('href="/neuron/toy-cnn/conv1/') >= 5 and html.count('href="/neuron/toy-cnn/fc/') >= 4
    status, first = get_json(server, "/neuron/toy-cnn/conv1/0.json")
    assert "fed_by" not in first["links"] and first["links"]["feeds"]["layer"] == "layer1.0.conv2"


def test_card_of_a_store_written_before_act_map(tmp_path):
    """A store whose activations files predate act_map opens, its column reads NULL and the card
    draws the image and box alone (no heatmap, no route answer); new writes carry maps."""
    import dataclasses

    import pyarrow as pa

    from neurostore.store import Store
    from neurostore.web.render import Links, render

    old = Store.open(tmp_path / "s")
    ts = old.schemas["activations"]
    old.schemas["activations"] = dataclasses.replace(ts, columns=tuple(c for c in ts.columns if c.name != "act_map"))
    row = {"model": "m", "layer": "conv", "unit": 0, "rank": 0, "dataset": "d", "image_id": "i0", "act_value": 1.0,
           "act_mean": 0.5, "loc_y": 1, "loc_x": 1, "patch_id": None}
    with old.run("old", {}) as run:
        run.write("layers", pa.Table.from_pylist([{"model": "m", "layer": "conv", "kind": "conv", "n_units": 1,
                                                   "grid_h": 4, "grid_w": 4, "depth": 0, "depth_frac": 0.0}]))
        run.write("activations", pa.Table.from_pylist([row]))
    store = Store.open(tmp_path / "s")  # today's schema
    assert "act_map" not in store.manifest()["tables"]["activations"][0]["columns"]
    card = D.neuron_card(store.sql, "m", "conv", 0)
    assert card["patches"][0]["act_map"] is None and not card["patches"][0]["has_map"]
    html = render("neuron.html", card, Links())
    assert 'class="where"' in html and 'class="heat"' not in html and "heatmap:" not in html
    assert D.heatmap_of(store.sql, "m", "conv", 0, 0) is None
    cells = [[0, 100, 0, 0]] * 4
    with store.run("new", {}) as run:
        run.write("activations", pa.Table.from_pylist([{**row, "rank": 1, "image_id": "i1", "act_map": cells}]))
    got = store.sql("SELECT rank, act_map FROM activations ORDER BY rank").to_pylist()
    assert got == [{"rank": 0, "act_map": None}, {"rank": 1, "act_map": cells}]


def test_the_map_lies_over_the_region_the_model_saw():
    """A resize + centre-crop model saw the central square of a 4:3 image: the heatmap and its
    max cell go there (as the cut box did), not stretched over the whole image."""
    from neurostore.patches import to_image_box
    from neurostore.web.data import _seen_region

    top = {"width": 500, "height": 375}
    assert _seen_region(top, 224, 0.875) == to_image_box((0, 0, 224, 224), 224, 500, 375, 0.875) == (85, 23, 415, 352)
    assert _seen_region(top, 224, None) == (0, 0, 500, 375)   # whole image resized (the probe world)
    assert _seen_region(top, None, None) == (0, 0, 500, 375)  # a store written before crop_fraction

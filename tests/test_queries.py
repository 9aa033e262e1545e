"""Named queries, macros and semantic SQL functions on a small real store."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_store import scores_table  # noqa: E402

from neurostore.errors import BadParameter, MissingParameter, QueryError, UnknownQuery  # noqa: E402
from neurostore.queries import get_query, list_queries, parse_param_pairs, parse_query  # noqa: E402
from neurostore.sqlfuncs import MINILM_ID, embed_concepts  # noqa: E402
from neurostore.store import Store  # noqa: E402

QUERIES = sorted(list_queries())
# Queries this module's fixture has data for (similar_concepts needs embed_concepts, tested below).
MINE = {"concept_neurons", "neuron_concepts", "layer_concept_counts", "runs", "top_units_for_concept",
        "model_concept_diff"}
# Values for every required parameter of every named query, on the fixture store.
REQUIRED = {"concept": "c3", "model": "m1", "layer": "layer1", "unit": "2", "phrase": "red circle",
            "model_a": "m1", "model_b": "m2"}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    s = Store.open(tmp_path_factory.mktemp("q") / "st")
    with s.run("dissect", {"models": ["m1", "m2"]}) as run:
        run.write("scores", scores_table("m1", "layer1", 20, seed=1))
        run.write("scores", scores_table("m1", "layer2", 20, seed=2))
        run.write("scores", scores_table("m2", "layer1", 20, seed=3, concepts=7))
        run.write("concepts", {"vocabulary": ["demo"] * 4, "concept": ["striped", "red", "circle", "grass"],
                               "category": ["texture", "colour", "shape", "background"]})
        run.write("layers", {"layer": ["layer1", "layer2"], "kind": ["conv", "conv"], "n_units": [20, 20],
                             "grid_h": [8, 4], "grid_w": [8, 4], "depth": [0, 1], "depth_frac": [0.0, 1.0],
                             "model": ["m1", "m1"]})
    yield s
    s.close()


def test_core_queries_exist():
    assert {"concept_neurons", "neuron_concepts", "layer_concept_counts", "runs", "top_units_for_concept"} <= set(QUERIES)


@pytest.mark.parametrize("name", QUERIES)
def test_every_named_query_runs_and_has_help(store, name):
    q = get_query(name)
    assert q.title and q.description and all(p.help for p in q.params)
    generic = {"VARCHAR": "m1", "INTEGER": "1", "BIGINT": "1", "DOUBLE": "0.5", "FLOAT": "0.5", "BOOLEAN": "true"}
    params = {p.name: REQUIRED.get(p.name, generic[p.type]) for p in q.params if p.required}
    got = store.query(name, params)  # every query binds and runs on a real store
    assert got.num_columns > 0
    if name in MINE:  # the store's own queries have data in this fixture
        assert got.num_rows > 0, name


def test_concept_neurons_matches_brute_force(store):
    got = store.query("concept_neurons", {"concept": "c3", "top": 7}).to_pylist()
    brute = store.sql("""SELECT model, layer, unit FROM scores WHERE concept = 'c3'
                         ORDER BY score DESC, model, layer, unit LIMIT 7""").to_pylist()
    assert [(r["model"], r["layer"], r["unit"]) for r in got] == [(b["model"], b["layer"], b["unit"]) for b in brute]
    # the macro gives the same answer inside any SQL
    assert store.sql("SELECT count(*) n FROM concept_neurons('c3', top_n := 7)").column("n")[0].as_py() == 7


def test_concept_neurons_is_the_one_concept_search(store):
    """Filters by model and layer lists, top_n := NULL for every unit, `rank` orders joined answers;
    find and the web app call this macro, so their answers are its rows."""
    every = store.sql("SELECT model, layer, unit FROM concept_units WHERE concept = 'c3'").to_pylist()
    got = store.sql("SELECT * FROM concept_neurons('c3', top_n := NULL)").to_pylist()
    assert len(got) == len(every) > 10 and [r["rank"] for r in got] == list(range(len(got)))
    top = store.sql("SELECT * FROM concept_neurons('c3', top_n := 10)").to_pylist()
    assert top == got[:10]
    m1 = store.sql("SELECT * FROM concept_neurons('c3', top_n := NULL, model_ids := ['m1'], "
                   "layer_names := ['layer2'])").to_pylist()
    assert m1 and {(r["model"], r["layer"]) for r in m1} == {("m1", "layer2")}
    assert [r["unit"] for r in m1] == [r["unit"] for r in got if (r["model"], r["layer"]) == ("m1", "layer2")]
    both = store.sql("""SELECT n.* FROM unnest(['c3', 'c1']) AS c(name), concept_neurons(c.name, top_n := 3) n
                        ORDER BY n.concept, n.rank""").to_pylist()
    assert [r["concept"] for r in both] == ["c1"] * 3 + ["c3"] * 3 and [r["rank"] for r in both] == [0, 1, 2] * 2
    # a caller's alias named as the macro's own tables were (c, h) is the caller's, not the macro's
    for alias in ("c", "h", "hits"):
        same = store.sql(f"""SELECT n.* FROM unnest(['c3', 'c1']) AS {alias}(concept),
                             concept_neurons({alias}.concept, top_n := 3) n ORDER BY n.concept, n.rank""").to_pylist()
        assert same == both, alias
    first = store.query("concept_neurons", {"concept": "c3", "top": 5}).column_names
    assert first[:12] == ["model", "layer", "unit", "concept", "scorer", "score", "confidence", "rank_in_model",
                          "headline", "vocabulary", "encoder", "run_id"]  # existing queries keep working


def test_neuron_concepts_and_layer_counts(store):
    got = store.query("neuron_concepts", {"model": "m1", "layer": "layer1", "unit": 2}).to_pylist()
    assert [r["rank"] for r in got] == [0, 1, 2, 3, 4] and {r["unit"] for r in got} == {2}
    counts = store.query("layer_concept_counts", {"model": "m1"}).to_pylist()
    assert sum(r["n_units"] for r in counts if r["layer"] == "layer1") == 20
    assert {r["model"] for r in counts} == {"m1"}


def test_injection_is_data(store):
    evil = "x'; DROP TABLE runs; --"
    assert store.query("concept_neurons", {"concept": evil}).num_rows == 0
    assert store.query("neuron_concepts", {"model": evil, "layer": evil, "unit": 1}).num_rows == 0
    assert store.sql("SELECT count(*) n FROM scores WHERE concept = $c", {"c": evil}).column("n")[0].as_py() == 0
    assert store.sql("SELECT count(*) n FROM runs").column("n")[0].as_py() == 1


def test_parameter_errors(store):
    with pytest.raises(UnknownQuery, match=r"^Unknown query 'concept_neuron'\. Did you mean concept_neurons"):
        store.query("concept_neuron", {})
    with pytest.raises(MissingParameter, match=r"^Query 'concept_neurons' needs parameter 'concept' \(VARCHAR"):
        store.query("concept_neurons", {})
    with pytest.raises(BadParameter, match=r"^Parameter 'top' of query 'concept_neurons' must be INTEGER, got 'many'"):
        store.query("concept_neurons", {"concept": "c1", "top": "many"})
    with pytest.raises(QueryError, match=r"^A count \(top, k, limit\) is negative; give 0 or more\.$"):
        store.query("concept_neurons", {"concept": "c1", "top": -3})   # DuckDB's binder error, with a wrong hint
    with pytest.raises(BadParameter, match=r"^Query 'concept_neurons' has no parameter 'concpt'\. Did you mean concept"):
        store.query("concept_neurons", {"concpt": "c1"})
    with pytest.raises(BadParameter, match="is not key=value"):
        parse_param_pairs(["concept"])
    with pytest.raises(QueryError, match="Parser Error"):
        store.sql("SELEC 1")


def test_query_header_must_declare_what_sql_uses(tmp_path):
    p = tmp_path / "bad.sql"
    p.write_text("-- description: x\n-- param a INTEGER: a\nSELECT $a, $b\n")
    with pytest.raises(QueryError, match=r"differ from those declared"):
        parse_query(p)
    p.write_text("-- description: x\n-- param a INTEGER = 3: a\n-- param s VARCHAR = NULL: s\nSELECT $a AS a, $s AS s\n")
    q = parse_query(p)
    assert q.bind({}) == {"a": 3, "s": None} and q.bind({"a": "5"}) == {"a": 5, "s": None}


def test_semantic_functions(store):
    sims = store.sql("""SELECT text_similarity('cat', 'kitten') AS near,
                               text_similarity('cat', 'carburetor') AS far,
                               typeof(text_embedding('cat')) AS t""").to_pylist()[0]
    assert sims["near"] > sims["far"] + 0.2 and sims["t"] == "FLOAT[384]"
    out = embed_concepts(store, "demo")
    assert out["concepts"] == 4
    assert store.sql("SELECT count(*) n FROM embeddings WHERE encoder = $e", {"e": MINILM_ID}).column("n")[0].as_py() == 4
    got = store.query("similar_concepts", {"phrase": "zebra stripes", "k": 2}).to_pylist()
    assert got[0]["concept"] == "striped" and len(got) == 2
    # re-embedding the same vocabulary replaces, never duplicates
    embed_concepts(store, "demo")
    assert store.sql("SELECT count(*) n FROM embeddings").column("n")[0].as_py() == 4
    assert store.sql("SELECT concept FROM similar_concepts('crimson', k := 1)").to_pylist() == [{"concept": "red"}]


def test_api_errors_name_arguments_and_the_cli_names_flags():
    """The API speaks of its arguments; cli_message (used by the CLI's main) turns them into flags."""
    from neurostore.errors import cli_message

    q = get_query("concept_neurons")
    with pytest.raises(MissingParameter) as e:
        q.bind({})
    assert "Pass params={'concept': VALUE}." in str(e.value) and "--param" not in str(e.value)
    assert cli_message(e.value).endswith("Pass --param concept=VALUE.")
    with pytest.raises(BadParameter) as e:
        q.bind({"concept": "a", "top": "lots"})
    assert str(e.value).endswith("Pass e.g. params={'top': 50}.")
    assert cli_message(e.value).endswith("Pass e.g. --param top=50.")

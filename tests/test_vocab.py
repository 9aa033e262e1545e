"""Vocabularies: builtins, files, LLM-generated (against a local Messages API server), the
fallback without a key, store rows, and the `neurostore vocab` commands."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from neurostore import llm, vocab
from neurostore.errors import BadInput, UnknownVocabulary
from test_llm import FAST, MessagesServer, ok  # the same local server as the LLM tests

ROOT = Path(__file__).resolve().parents[1]


def schema_columns(table: str) -> list[str]:
    sql = (ROOT / "schema" / f"{table}.sql").read_text()
    return re.findall(r"^\s+(\w+)\s+[A-Z]", sql, flags=re.M)


# ---- builtins --------------------------------------------------------------------------------


def test_english_content_words():
    v = vocab.load_vocabulary("english")
    assert (v.name, v.source, len(v)) == ("english", "builtin", 10_000)
    stop = vocab.stopwords()
    assert all(w.isalpha() and w.isascii() and len(w) >= 3 and w not in stop for w in v.concepts)
    assert len(set(v.concepts)) == len(v)
    for function_word in ("the", "and", "with", "which", "would"):
        assert function_word not in v.concepts
    for content_word in ("water", "house", "red", "dog"):
        assert content_word in v.concepts
    small = vocab.load_vocabulary("english-3k")
    assert small.name == "english-3k" and small.concepts == v.concepts[:3000]
    assert len(vocab.load_vocabulary("english-20k")) == 20_000
    with pytest.raises(BadInput, match="100..50000"):
        vocab.load_vocabulary("english-99")


def test_imagenet_from_torchvision_metadata():
    v = vocab.load_vocabulary("imagenet")
    assert v.concepts[:3] == ["tench", "goldfish", "great white shark"]
    assert len(v.meta["logit_order"]) == 1000
    assert len(v) == len({c.lower() for c in v.meta["logit_order"]})  # names equal in lowercase merged
    assert set(v.categories) == {"object"}


def test_probe_vocabulary_with_and_without_world():
    v = vocab.load_vocabulary("probe")
    cats = dict(zip(v.concepts, v.categories))
    for shape in ("circle", "square", "triangle", "star", "cross", "ring"):
        assert cats[shape] == "shape"
    assert cats["red"] == "colour" and cats["striped"] == "texture"
    assert cats["watermark"] == "cue"
    assert cats["dog"] == "distractor:object" and cats["oval"] == "distractor:shape"
    world = SimpleNamespace(id="probe-1234abcd",
                            concepts={"shape": ["circle", "ring"], "colour": ["Pink"], "cue": ["dot"]})
    w = vocab.load_vocabulary("probe", world=world)
    assert w.concepts[:4] == ["circle", "ring", "pink", "dot"]
    assert w.source == "builtin:probe-1234abcd"
    assert "pink" not in [c for c, k in zip(w.concepts, w.categories) if k.startswith("distractor")]
    assert vocab.probe(world, distractors=False).concepts == ["circle", "ring", "pink", "dot"]
    with pytest.raises(BadInput):
        vocab.probe(SimpleNamespace(id="x"))


def test_unknown_vocabulary_lists_valid_names():
    with pytest.raises(UnknownVocabulary) as e:
        vocab.load_vocabulary("imagenett")
    msg = str(e.value)
    assert "Did you mean imagenet" in msg and "file:PATH" in msg and "llm:DOMAIN" in msg


# ---- files -----------------------------------------------------------------------------------


def test_file_vocabulary(tmp_path):
    f = tmp_path / "mine.txt"
    f.write_text("# my concepts\nStriped\n\n  polka   dot \nstriped  # again\nwheel\tpart\n")
    v = vocab.load_vocabulary(f"file:{f}")
    assert v.concepts == ["striped", "polka dot", "wheel"]
    assert v.categories == [None, None, "part"]
    assert v.source == f"file:{f.resolve()}" and v.name == "file:mine"


def test_a_file_saved_with_a_bom_and_crlf_reads_its_first_concept_whole(tmp_path):
    f = tmp_path / "win.txt"
    f.write_bytes("\ufeffdog\r\ncat\r\n".encode("utf-8"))
    assert vocab.load_vocabulary(f"file:{f}").concepts == ["dog", "cat"]


def test_two_files_of_one_name_never_share_a_vocabulary(tmp_path):
    """file:animals from another folder (or the same file edited) holds other concepts: it is
    stored under a name of its own, so the first file's concepts and explanations stay."""
    from neurostore.pipeline import resolve_vocabulary
    from neurostore.store import Store

    store = Store.open(tmp_path / "s")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "animals.txt").write_text("dog\ncat\n")
    (tmp_path / "b" / "animals.txt").write_text("dog\nhorse\n")
    first = resolve_vocabulary(f"file:{tmp_path / 'a' / 'animals.txt'}", store)
    assert first.name == "file:animals"
    with store.run("vocab", {}) as run:
        run.write("concepts", vocab.concepts_table(first))
    said = []
    again = resolve_vocabulary(f"file:{tmp_path / 'a' / 'animals.txt'}", store, log=said.append)
    other = resolve_vocabulary(f"file:{tmp_path / 'b' / 'animals.txt'}", store, log=said.append)
    assert again.name == "file:animals" and other.concepts == ["dog", "horse"]
    assert other.name.startswith("file:animals-") and len(other.name) == len("file:animals-") + 6
    assert len(said) == 1 and other.name in said[0]


def test_file_vocabulary_errors(tmp_path):
    with pytest.raises(BadInput, match="does not exist"):
        vocab.load_vocabulary(f"file:{tmp_path / 'missing.txt'}")
    listed = tmp_path / "listed.txt"
    listed.write_text("dog, cat, tree\n")
    with pytest.raises(BadInput, match="is one line of commas. Put one concept per line"):
        vocab.load_vocabulary(f"file:{listed}")
    with pytest.raises(UnknownVocabulary, match=f"A vocabulary file is given as file:{listed}"):
        vocab.load_vocabulary(str(listed))   # the path without file:
    sheet = tmp_path / "animals.csv"   # a spreadsheet's export: 'dog,animal' was one concept
    sheet.write_text('concept,category\ndog,animal\n"hot dog",food\ntree\n')
    v = vocab.load_vocabulary(f"file:{sheet}")
    assert v.concepts == ["dog", "hot dog", "tree"] and v.categories == ["animal", "food", None]
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing here\n\n")
    with pytest.raises(BadInput, match="no concepts"):
        vocab.load_vocabulary(f"file:{empty}")


# ---- LLM-generated ---------------------------------------------------------------------------


def test_llm_vocabulary_and_cache():
    reply = '```json\n["Feather", "beak", "bird feeder", "beak"]\n```'
    cache: dict = {}
    with MessagesServer([ok(reply)]) as srv:
        kw = {"api_key": "sk-test", "base_url": srv.url, "policy": FAST}
        v = vocab.load_vocabulary("llm:garden birds", model="claude-test", n=4, cache=cache, **kw)
        again = vocab.generate_vocabulary("Garden  birds", n=4, model="claude-test", cache=cache, **kw)
    assert v.concepts == ["feather", "beak", "bird feeder"]
    assert v.source == "llm:claude-test" and v.description == "garden birds"
    assert v.cache_key == vocab.llm_cache_key("claude-test", "garden birds", 4)
    assert v.name == f"llm:garden-birds-{v.cache_key[:4]}"
    assert len(srv.requests) == 1                               # the second came from the cache
    assert again.concepts == v.concepts and again.meta["cached"]
    assert vocab.llm_cache_key("claude-test", "garden birds", 5) != v.cache_key
    assert vocab.llm_cache_key("other-model", "garden birds", 4) != v.cache_key


def test_an_llm_vocabulary_in_the_store_is_read_back_and_never_replaced(tmp_path):
    """The store's list of the same request is used, not a new reply (the lookup never matched the
    stored name, so each dissect asked again and the second reply replaced the first's concepts
    under the same name, orphaning its scores); a different list under that name gets its own."""
    from neurostore.pipeline import resolve_vocabulary
    from neurostore.store import Store

    store = Store.open(tmp_path / "s")

    def stored(v, store=store):
        with store.run("dissect", {"v": v.name}) as run:
            run.write("vocabularies", vocab.vocabulary_table(v), key=f"vocab:{v.name}")
            run.write("concepts", vocab.concepts_table(v), key=f"vocab:{v.name}")

    with MessagesServer([ok('["feather", "beak", "nest"]'), ok('["wing", "egg", "perch"]')]) as srv:
        kw = {"model": "claude-test", "n": 3, "api_key": "sk-test", "base_url": srv.url, "policy": FAST}
        first = resolve_vocabulary("llm:garden birds", store, **kw)
        stored(first)
        again = resolve_vocabulary("llm:garden birds", store, **kw)
        assert len(srv.requests) == 1 and again.name == first.name and again.meta["cached"]
        assert sorted(again.concepts) == sorted(first.concepts)
        # a store holding that name with other concepts from elsewhere (an older neurostore's reply)
        older = Store.open(tmp_path / "older")
        stored(dataclasses.replace(first, source="llm:older", concepts=["x", "y", "z"]), older)
        said = []
        other = resolve_vocabulary("llm:garden birds", older, log=said.append, **kw)
    assert other.name.startswith(first.name + "-") and other.concepts == ["wing", "egg", "perch"]
    assert "these are stored as" in said[0]


def test_an_empty_domain_is_refused_before_any_request():
    with pytest.raises(BadInput, match="domain is empty"):
        vocab.generate_vocabulary("   ", n=3, api_key="sk-test", base_url="http://127.0.0.1:9")


def test_llm_vocabulary_without_key_falls_back(monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.setattr(vocab, "FALLBACK_POOL", 300)            # a smaller pool: quicker test
    with pytest.warns(llm.NoAPIKeyWarning, match="ANTHROPIC_API_KEY is not set"):
        v = vocab.generate_vocabulary("water and the sea", n=10)
    assert v.source == "fallback:english-300+minilm" and v.cache_key is None
    assert len(v) == 10 and "water" in v.concepts
    assert set(v.concepts) <= set(vocab.english(300).concepts)


# ---- rows for the store ----------------------------------------------------------------------


def test_store_rows_match_schema():
    v = vocab.load_vocabulary("probe")
    t = vocab.vocabulary_table(v)
    assert t.column_names == [c for c in schema_columns("vocabularies") if c != "run_id"]
    assert t.to_pylist()[0]["n_concepts"] == len(v)
    c = vocab.concepts_table(v)
    assert c.column_names == [c for c in schema_columns("concepts") if c != "run_id"]
    assert c.num_rows == len(v) and c.column("concept").to_pylist() == v.concepts


# ---- CLI -------------------------------------------------------------------------------------


def run_cli(*args, env_extra=None):
    import os

    env = {k: v for k, v in os.environ.items() if k != "ANTHROPIC_API_KEY"}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "neurostore.cli", *args], capture_output=True,
                          text=True, env=env, timeout=300)


def test_cli_vocab_list_show_and_errors(tmp_path):
    r = run_cli("vocab", "list", "--json")
    assert r.returncode == 0, r.stderr
    names = [row["name"] for row in json.loads(r.stdout)["vocabularies"]]
    assert names[:3] == ["english", "imagenet", "probe"]
    f = tmp_path / "c.txt"
    f.write_text("alpha\nbeta\ngamma\n")
    r = run_cli("vocab", "show", f"file:{f}", "--limit", "2", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["n_concepts"] == 3 and d["concepts"] == ["alpha", "beta"]
    r = run_cli("vocab", "show", "englsh")
    assert r.returncode == 1
    assert r.stderr.strip().startswith("Error: Unknown vocabulary 'englsh'. Did you mean english")


def test_cli_vocab_generate_against_local_server():
    with MessagesServer([ok('["sail", "mast", "hull"]')]) as srv:
        r = run_cli("vocab", "generate", "--domain", "sailing boats", "--n", "3", "--json",
                    "--model", "claude-test",
                    env_extra={"ANTHROPIC_API_KEY": "sk-cli", "ANTHROPIC_BASE_URL": srv.url})
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["concepts"] == ["sail", "mast", "hull"] and d["source"] == "llm:claude-test"
    assert srv.requests[0]["json"]["model"] == "claude-test"

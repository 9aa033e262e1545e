"""The store and query commands, run through the real entry point (`main()`), exit codes and the
exact `Error:` lines."""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_store import scores_table  # noqa: E402

from neurostore import cli  # noqa: E402
from neurostore.errors import unknown  # noqa: E402
from neurostore.queries import list_queries  # noqa: E402
from neurostore.schema import load_schemas  # noqa: E402
from neurostore.store import Store  # noqa: E402

from _cli import run_cli  # noqa: E402


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "st"
    with Store.open(path) as s:
        with s.run("dissect", {"m": 1}) as run:
            run.write("scores", scores_table("m1", "layer1", 10))
            run.write("scores", scores_table("m2", "layer1", 10))
    return path




def test_query_csv_json_parquet(store_dir, capsys, monkeypatch, tmp_path):
    code, out, _ = run_cli(capsys, monkeypatch, "query", "concept_neurons", "-p", "concept=c3", "--param", "top=4",
                           "--store", store_dir, "--format", "csv")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert len(rows) == 4 and {r["concept"] for r in rows} == {"c3"}
    code, out, _ = run_cli(capsys, monkeypatch, "query", "neuron_concepts", "-p", "model=m1", "-p", "layer=layer1",
                           "-p", "unit=3", "--store", store_dir, "-f", "json")
    assert code == 0 and [r["rank"] for r in json.loads(out)] == [0, 1, 2, 3, 4]
    dest = tmp_path / "out.parquet"
    code, _, _ = run_cli(capsys, monkeypatch, "sql", "SELECT * FROM scores WHERE model = $m", "-p", "m=m2",
                         "--store", store_dir, "-f", "parquet", "-o", dest)
    assert code == 0 and pq.read_table(dest).num_rows == 50


def test_a_query_with_no_rows_names_the_model_or_method_the_store_lacks(store_dir, capsys, monkeypatch):
    scorer = Store.open(store_dir, read_only=True).sql("SELECT any_value(scorer) AS s FROM scores")["s"][0].as_py()
    code, out, err = run_cli(capsys, monkeypatch, "query", "concept_neurons", "-p", "concept=c3", "-p",
                             f"scorer={scorer}x", "--store", store_dir)
    assert code == 0 and "0 rows" in out + err
    assert f"note: no method '{scorer}x' in this store. Did you mean {scorer}?" in " ".join(err.split())
    code, out, err = run_cli(capsys, monkeypatch, "query", "neuron_concepts", "-p", "model=m1", "-p", "layer=layer9",
                             "-p", "unit=0", "--store", store_dir)
    assert code == 0 and "note: no layer 'layer9' of model 'm1'. Did you mean layer1" in " ".join(err.split())


def test_env_store_and_table_output(store_dir, capsys, monkeypatch):
    monkeypatch.setenv("NEUROSTORE_STORE", str(store_dir))
    code, out, _ = run_cli(capsys, monkeypatch, "tables", "--json")
    assert code == 0
    got = json.loads(out)
    assert {t["table"]: t["rows"] for t in got["tables"]}["scores"] == 100
    code, out, _ = run_cli(capsys, monkeypatch, "schema", "scores")
    assert code == 0 and "channel / neuron index" in out and "INTEGER" in out
    # before any store exists, a table's schema is still there to read (and none is created)
    code, out, _ = run_cli(capsys, monkeypatch, "schema", "scores", "--json", "--store", str(store_dir / "none"))
    assert code == 0 and json.loads(out)["rows"] is None and not (store_dir / "none").exists()
    assert {c["column"] for c in json.loads(out)["columns"]} >= {"model", "layer", "unit", "concept"}
    code, out, _ = run_cli(capsys, monkeypatch, "runs", "-f", "json")
    assert code == 0 and json.loads(out)[0]["status"] == "committed"
    assert json.loads(out)[0]["params"] == {"m": 1} and json.loads(out)[0]["rows_written"]["scores"] == 100
    code, out, _ = run_cli(capsys, monkeypatch, "query", "--list", "-f", "json")
    names = [q["name"] for q in json.loads(out)["queries"]]
    assert code == 0 and "concept_neurons" in names


def test_long_cells_are_cut_in_tables_and_whole_in_json(store_dir, capsys, monkeypatch):
    long = "x" * (cli.TABLE_MAX_CELL + 50)
    code, out, err = run_cli(capsys, monkeypatch, "sql", "SELECT $v AS v", "-p", f"v={long}", "--store", store_dir)
    assert code == 0 and long not in out and "x" * (cli.TABLE_MAX_CELL - 1) + "…" in out.replace("│", "").replace(
        "\n", "").replace(" ", "")
    assert "were cut" in err and "--format json" in err
    code, out, _ = run_cli(capsys, monkeypatch, "sql", "SELECT $v AS v", "-p", f"v={long}", "--store", store_dir,
                           "-f", "json")
    assert json.loads(out) == [{"v": long}]
    code, out, err = run_cli(capsys, monkeypatch, "query", "--list")   # descriptions are not the store's cells
    assert code == 0 and "were cut" not in err and "…" not in out


def test_injection_through_cli_is_data(store_dir, capsys, monkeypatch):
    evil = "x'; DROP TABLE runs; --"
    code, out, _ = run_cli(capsys, monkeypatch, "query", "concept_neurons", "-p", f"concept={evil}",
                           "--store", store_dir, "-f", "json")
    assert code == 0 and json.loads(out) == []
    code, out, _ = run_cli(capsys, monkeypatch, "sql", "SELECT count(*) AS n FROM runs", "--store", store_dir, "-f", "json")
    assert json.loads(out) == [{"n": 1}]


def test_export(store_dir, capsys, monkeypatch, tmp_path):
    code, out, _ = run_cli(capsys, monkeypatch, "export", "--store", store_dir, "--to", tmp_path / "exp", "--json")
    assert code == 0 and json.loads(out)["tables"]["scores"] == 100
    assert (tmp_path / "exp/load.sql").exists()


@pytest.mark.parametrize("args, line", [
    (["tables", "--store", "{missing}"],
     "Error: No neurostore store at '{missing}'. Create one with 'neurostore demo --store {missing}' (or any "
     "command that writes), or pass --store PATH / set $NEUROSTORE_STORE."),
    (["query", "nope", "--store", "{store}"],
     "Error: " + unknown("query", "nope", list_queries(), "See 'neurostore query --list'.")),
    (["query", "concept_neurons", "--store", "{store}"],
     "Error: Query 'concept_neurons' needs parameter 'concept' (VARCHAR: the concept word or phrase, e.g. "
     "'striped'). Pass --param concept=VALUE."),
    (["query", "concept_neurons", "-p", "concept=a", "-p", "top=lots", "--store", "{store}"],
     "Error: Parameter 'top' of query 'concept_neurons' must be INTEGER, got 'lots'. Pass e.g. --param top=50."),
    (["schema", "scorez", "--store", "{store}"],
     "Error: " + unknown("table", "scorez", load_schemas(), "See 'neurostore tables'.")),
    (["sql", "SELECT * FROM scorez", "--store", "{store}"],
     "Error: " + unknown("table", "scorez", load_schemas(), "See 'neurostore tables'.")),
    (["sql", "SELECT 1", "--store", "{store}", "-f", "parquet"],
     "Error: --format parquet writes a file: pass --output FILE.parquet."),
    (["sql", "SELECT 1", "--store", "{store}", "-f", "xml"],
     "Error: Unknown format 'xml'. Valid: csv, json, parquet, table. Pass --format table, csv, json or parquet."),
])
def test_error_lines(store_dir, tmp_path, capsys, monkeypatch, args, line):
    missing = tmp_path / "no-store"
    fill = lambda s: s.format(missing=missing, store=store_dir)  # noqa: E731
    code, out, err = run_cli(capsys, monkeypatch, *[fill(a) for a in args])
    assert code == 1 and out == ""
    assert err.strip() == fill(line)
    assert err.count("\n") == 1  # one line
    assert not missing.exists()  # a reading command never creates a store


def test_a_failed_command_under_json_prints_its_error_as_json(tmp_path, capsys, monkeypatch):
    """A script parsing stdout meets the reason as one JSON object, not empty input."""
    missing = tmp_path / "no-store"
    code, out, err = run_cli(capsys, monkeypatch, "find", "dog", "--store", missing, "--json")
    assert code == 1 and err.startswith("Error: No neurostore store at")
    said = json.loads(out)
    assert said == {"error": err.strip()[len("Error: "):], "kind": "StoreNotFound"}


def test_a_full_or_read_only_disk_is_one_line_not_a_traceback(store_dir, capsys, monkeypatch, tmp_path):
    import errno

    from neurostore.store.export import Export

    for code_, text in ((errno.ENOSPC, "No space left on device"), (errno.EROFS, "Read-only file system")):
        def full(self, to, overwrite=False):
            raise OSError(code_, text, str(to))

        monkeypatch.setattr(Export, "export", full)
        code, out, err = run_cli(capsys, monkeypatch, "export", "--to", tmp_path / "x", "--store", store_dir, "--json")
        assert code == 1 and err.count("\n") == 1 and err.startswith(f"Error: {text} ('{tmp_path / 'x'}'). ")
        assert json.loads(out)["kind"] == "OSError"
    monkeypatch.setattr(Export, "export", lambda self, to, overwrite=False: open("/nonexistent/dir/file"))
    with pytest.raises(FileNotFoundError):   # not the disk's failure: a bug keeps its traceback
        run_cli(capsys, monkeypatch, "export", "--to", tmp_path / "y", "--store", store_dir)


def test_every_store_command_has_an_example():
    import typer.main

    group = typer.main.get_command(cli.app)
    for name in ("sql", "query", "tables", "schema", "export", "runs"):
        assert "Example:" in (group.commands[name].help or ""), name

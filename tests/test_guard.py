"""The SQL console guard: only single SELECT/EXPLAIN statements, on a read-only snapshot with file
and network access disabled and the configuration locked; a deadline and a row cap."""

import time

import duckdb
import pytest

from _webstore import shared_store
from neurostore.errors import QueryError
from neurostore.guard import QueryRefused, QueryTimeout, SafeDB, check_statement
from neurostore.store import Store


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    path, _ = shared_store(tmp_path_factory)
    d = SafeDB.from_store(Store.open(path, read_only=True), timeout=1.5, max_rows=100)
    yield d
    d.close()


BAD = [
    ("SELECT * FROM read_csv('/etc/passwd')", None),
    ("SELECT * FROM read_csv_auto('/etc/passwd', sep=':')", None),
    ("SELECT * FROM read_text('/etc/passwd')", None),
    ("SELECT * FROM read_blob('/etc/passwd')", None),
    ("SELECT * FROM read_parquet('/etc/hostname')", None),
    ("SELECT * FROM glob('/etc/*')", None),
    ("SELECT * FROM sniff_csv('/etc/passwd')", None),
    ("SELECT * FROM '/etc/passwd'", "does not exist"),  # no replacement scans of files when locked
    ("COPY scores TO '{tmp}/out.csv'", "COPY"),
    ("COPY (SELECT 1) TO '{tmp}/out.parquet' (FORMAT parquet)", "COPY"),
    ("EXPORT DATABASE '{tmp}/exported'", "EXPORT"),
    ("ATTACH '{tmp}/other.duckdb' AS other", "ATTACH"),
    ("DETACH snapshot", "DETACH"),
    ("INSTALL httpfs", "LOAD"),
    ("LOAD httpfs", "LOAD"),
    ("SET enable_external_access = true", "SET"),
    ("RESET enable_external_access", "SET"),
    ("PRAGMA enable_profiling", "PRAGMA"),
    ("CREATE TABLE t AS SELECT 1", "CREATE"),
    ("CREATE TEMP TABLE t AS SELECT 1", "CREATE"),
    ("CREATE MACRO m() AS 1", "CREATE"),
    ("DROP TABLE scores", "DROP"),
    ("INSERT INTO models (model) VALUES ('x')", "INSERT"),
    ("UPDATE models SET model = 'x'", "UPDATE"),
    ("DELETE FROM scores", "DELETE"),
    ("CALL pragma_version()", "CALL"),
    ("SELECT 1; SELECT 2", "statement"),
    ("SELECT 1; COPY scores TO '{tmp}/x.csv'", "statement"),
    ("", "Empty"),
]


@pytest.mark.parametrize("sql,word", BAD, ids=[b[0][:40] for b in BAD])
def test_console_refuses_and_writes_nothing(db, tmp_path, sql, word):
    sql = sql.format(tmp=tmp_path)
    with pytest.raises(QueryError) as e:
        db.console(sql)
    msg = str(e.value)
    if word == "does not exist":
        assert "passwd" in msg and "root:" not in msg
    elif word:
        assert isinstance(e.value, QueryRefused)
        assert word.lower() in msg.lower()
    else:  # a SELECT that names a file: DuckDB itself refuses it on the locked connection
        assert isinstance(e.value, QueryRefused)
        assert "cannot read or write files" in msg
    assert list(tmp_path.iterdir()) == [], "the query wrote something"


@pytest.mark.parametrize("sql", [
    "SELECT * FROM read_csv('/etc/passwd')",
    "COPY scores TO '{tmp}/out.csv'",
    "CREATE TABLE t AS SELECT 1",
    "INSERT INTO models (model) VALUES ('x')",
    "SET enable_external_access = true",
    "SET lock_configuration = false",
    "ATTACH '{tmp}/other.duckdb' AS other",
    "LOAD httpfs",
])
def test_connection_itself_refuses_without_the_statement_check(db, tmp_path, sql):
    """Defence in depth: even SQL that skipped the statement-type check cannot touch a file,
    change a setting or the catalog, because the connection is read-only and locked."""
    with pytest.raises(QueryError):
        db.run(sql.format(tmp=tmp_path))
    assert list(tmp_path.iterdir()) == []
    assert db.run("SELECT current_setting('enable_external_access') AS v")[0].column("v")[0].as_py() is False


@pytest.mark.parametrize("sql", [
    "SELECT count(*) AS n FROM scores",
    "  select model, count(*) from units group by model  ",
    "WITH t AS (SELECT * FROM scores WHERE rank = 0) SELECT concept, count(*) FROM t GROUP BY concept",
    "EXPLAIN SELECT * FROM scores WHERE unit = 3",
    "FROM models",
    "SELECT * FROM concept_neurons('red', top_n := 5)",
])
def test_console_runs_reads(db, sql):
    res = db.console(sql)
    assert res.table.num_rows > 0
    assert res.truncated is False
    assert res.statement_type in ("SELECT", "EXPLAIN")


def test_bound_parameters_and_missing_ones(db):
    res = db.console("SELECT DISTINCT unit FROM scores WHERE model = $m AND layer = $l AND unit = $u",
                     {"m": "toy-cnn", "l": "conv1", "u": "2", "ignored": "x"})
    assert res.table.column("unit").to_pylist() == [2]
    assert res.params == {"m": "toy-cnn", "l": "conv1", "u": 2}
    # A value is data, never SQL.
    res = db.console("SELECT count(*) AS n FROM scores WHERE concept = $c", {"c": "red' OR '1'='1"})
    assert res.table.column("n")[0].as_py() == 0
    with pytest.raises(QueryError, match=r"\$c"):
        db.console("SELECT * FROM scores WHERE concept = $c")


def test_named_query_runs_under_the_guard(db):
    res = db.named("concept_neurons", {"concept": "striped", "top": "3"})
    assert res.named_query == "concept_neurons"
    assert res.table.num_rows == 3
    assert set(res.table.column("concept").to_pylist()) == {"striped"}


def test_row_cap_reports_truncated(db):
    res = db.console("SELECT * FROM range(5000) t(i)")
    assert res.table.num_rows == 100 and res.truncated is True
    assert res.to_dict()["truncated"] is True
    res = db.console("SELECT * FROM range(100) t(i)")
    assert res.table.num_rows == 100 and res.truncated is False


def test_slow_query_is_stopped_at_the_deadline(db):
    t0 = time.perf_counter()
    with pytest.raises(QueryTimeout, match="1.5 s"):
        db.console("SELECT count(*) FROM range(1000000000) a, range(1000000000) b WHERE a.range + b.range = 7")
    elapsed = time.perf_counter() - t0
    assert 1.4 < elapsed < 10, elapsed
    # The connection is still good afterwards.
    assert db.console("SELECT 42 AS x").table.column("x")[0].as_py() == 42


def test_semantic_functions_work_on_the_locked_connection(db):
    res = db.console("SELECT * FROM similar_concepts('stripes', k := 3)")
    assert res.table.column("concept")[0].as_py() == "striped"


def test_check_statement_types():
    assert check_statement("SELECT 1").type == duckdb.StatementType.SELECT
    for sql in ("PRAGMA version", "SHOW TABLES; SELECT 1", "VACUUM"):
        with pytest.raises(QueryRefused):
            check_statement(sql)
    with pytest.raises(QueryError, match="does not parse"):
        check_statement("SELEC 1")


def test_snapshot_leaves_oversized_tables_empty(tmp_path_factory):
    path, _ = shared_store(tmp_path_factory)
    d = SafeDB.from_store(Store.open(path, read_only=True), max_table_bytes=0)
    try:
        assert d.info["skipped"] and "scores" in d.info["skipped"]
        assert d.run("SELECT count(*) AS n FROM scores")[0].column("n")[0].as_py() == 0
    finally:
        tmp = d.tmpdir
        d.close()
    assert not tmp.exists()  # the snapshot is removed on close

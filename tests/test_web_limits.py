"""The web app's limits: bytes as well as rows, one deadline for the query and its conversion,
the Host check (DNS rebinding), idle and excess connections, and SIGTERM removing the snapshot."""

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse

import duckdb
import pytest

from _webstore import shared_store
from neurostore.guard import ConsoleResult, QueryTimeout
from neurostore.web import make_server


@contextlib.contextmanager
def running(tmp_path_factory, **options):
    """A web server over the shared test store with `options`, on any free port."""
    path, _ = shared_store(tmp_path_factory)
    server = make_server(path, port=0, quiet=True, warm=False, **options)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running(tmp_path_factory) as s:
        yield s


def request(server, path, host=None):
    """(status, headers, body) of a GET with the given Host header (default: the bound address)."""
    port = server.server_address[1]
    con = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        con.putrequest("GET", path, skip_host=True)
        con.putheader("Host", host if host is not None else f"127.0.0.1:{port}")
        con.endheaders()
        r = con.getresponse()
        return r.status, r.headers, r.read()
    finally:
        con.close()


def sql(server, q, json_=True):
    status, _, body = request(server, "/sql" + (".json" if json_ else "") + "?" + urllib.parse.urlencode({"q": q}))
    return status, (json.loads(body) if json_ else body)


# ---- bytes ----------------------------------------------------------------------------------

def test_a_huge_cell_is_cut_before_it_is_sent(server):
    status, data = sql(server, "SELECT repeat('x', 20000000) AS s, 1 AS n")
    assert status == 200 and data["ok"] is True
    res = data["result"]
    assert res["cells_cut"] == 1 and res["rows"][0][1] == 1
    s = res["rows"][0][0]
    assert s.startswith("x" * 1000) and s.endswith("… [cut: 20,000,000 bytes]") and len(s) < 70_000
    assert "result_rows" not in data  # each result is sent once
    status, body = sql(server, "SELECT repeat('x', 20000000) AS s", json_=False)
    assert status == 200 and len(body) < 200_000 and b"cut short" in body


def test_nested_and_binary_cells_are_capped_too(server):
    status, data = sql(server, "SELECT [repeat('z', 200000)] AS l, repeat('ab', 100000)::BLOB AS b, 7 AS n")
    row = data["result"]["rows"][0]
    assert data["result"]["cells_cut"] == 2
    assert "above the 64 KiB cell limit" in row[0] and row[2] == 7
    assert row[1] == "[200,000 bytes, above the 64 KiB cell limit]"


def test_rows_stop_at_the_byte_cap(tmp_path_factory):
    with running(tmp_path_factory, max_bytes=1_000_000) as s:
        status, data = sql(s, "SELECT repeat('y', 10000) AS s FROM range(1000)")
        res = data["result"]
        assert status == 200 and res["truncated"] is True and res["truncated_by"] == "bytes"
        assert 50 < res["row_count"] < 100 and len(json.dumps(data)) < 1_100_000
        status, data = sql(s, "SELECT repeat('z', 100000) AS s FROM range(1000)")  # cut cells of the rows sent
        assert data["result"]["truncated_by"] == "bytes" and data["result"]["cells_cut"] == data["result"]["row_count"]
        status, body = sql(s, "SELECT repeat('y', 10000) AS s FROM range(1000)", json_=False)
        assert b"truncated</b> at 976 KiB" in body and len(body) < 1_300_000
        # The row cap is still reported as such.
        status, data = sql(s, "SELECT * FROM range(5000)")
        assert data["result"]["truncated_by"] == "rows" and data["result"]["row_count"] == 1000


def test_duplicate_column_names_keep_every_value(server):
    status, data = sql(server, "SELECT 1 AS a, 2 AS a")
    assert data["result"]["columns"] == ["a", "a"] and data["result"]["rows"] == [[1, 2]]


# ---- one deadline for the query and its conversion -------------------------------------------

def test_conversion_stops_at_the_deadline():
    from neurostore.web import result_dict

    table = duckdb.sql("SELECT range AS i, range::VARCHAR AS s FROM range(300000)").to_arrow_table()
    res = ConsoleResult(sql="...", params={}, table=table, truncated=False, elapsed=0.01)
    t0 = time.perf_counter()
    with pytest.raises(QueryTimeout, match="time limit"):
        result_dict(res, deadline=t0 + 0.05, max_bytes=1 << 40)
    assert time.perf_counter() - t0 < 2.0
    assert result_dict(res, deadline=t0 + 600, max_bytes=200)["row_count"] < 30  # the cap, without a deadline


def test_console_deadline_covers_serialization(tmp_path_factory):
    # DuckDB makes these 2M rows in a fraction of a second; turning them into JSON takes far longer.
    with running(tmp_path_factory, timeout=1.0, max_rows=2_000_000, max_bytes=1 << 40) as s:
        t0 = time.perf_counter()
        status, data = sql(s, "SELECT range AS i, range::VARCHAR AS s, range * 0.5 AS f FROM range(2000000)")
        assert status == 400 and data["error_type"] == "timeout" and "time limit" in data["error"]
        assert time.perf_counter() - t0 < 10


def test_console_queries_beyond_the_bound_wait_then_say_busy(tmp_path_factory):
    from neurostore.web import MAX_CONSOLE_QUERIES

    with running(tmp_path_factory, timeout=0.5) as s:
        for _ in range(MAX_CONSOLE_QUERIES):  # as if that many huge queries were running
            s.app._console_slots.acquire()
        status, data = sql(s, "SELECT 1")
        assert status == 400 and data["error_type"] == "timeout" and "busy" in data["error"]
        s.app._console_slots.release()
        status, data = sql(s, "SELECT 1")
        assert status == 200 and data["result"]["rows"] == [[1]]


# ---- Host --------------------------------------------------------------------------------------

def test_host_header_must_name_this_server(server):
    port = server.server_address[1]
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", f"LOCALHOST:{port}"):
        assert request(server, "/index.json", host)[0] == 200, host
    for host in ("evil.example", f"evil.example:{port}", f"localhost:{port + 1}", "localhost", "",
                 f"127.0.0.1:{port}.evil.example", f"[::1]x:{port}"):
        status, headers, body = request(server, "/index.json", host)
        assert status == 421 and b"toy-cnn" not in body, host
    status, _, body = request(server, "/sql.json?q=SELECT+1", f"evil.example:{port}")
    assert status == 421 and body.decode().startswith("Host 'evil.example:")
    assert "--allow-host" in body.decode()


def test_allow_host_adds_names(tmp_path_factory):
    with running(tmp_path_factory, allow_hosts=["nas.local"]) as s:
        port = s.server_address[1]
        assert request(s, "/index.json", f"nas.local:{port}")[0] == 200
        assert request(s, "/index.json", f"localhost:{port}")[0] == 200
        assert request(s, "/index.json", f"evil.example:{port}")[0] == 421


# ---- connections -------------------------------------------------------------------------------

def test_idle_and_half_open_connections_are_closed(tmp_path_factory):
    with running(tmp_path_factory, idle_timeout=0.5) as s:
        port = s.server_address[1]
        idle = socket.create_connection(("127.0.0.1", port))
        half = socket.create_connection(("127.0.0.1", port))
        half.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # headers never finished
        for sock in (idle, half):
            sock.settimeout(10)
            t0 = time.perf_counter()
            assert sock.recv(100) == b""  # closed by the server, not by our own timeout
            assert time.perf_counter() - t0 < 5
            sock.close()


def test_connections_beyond_the_bound_get_503(tmp_path_factory):
    with running(tmp_path_factory, max_connections=2, idle_timeout=30) as s:
        port = s.server_address[1]
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
        time.sleep(0.2)  # both accepted and holding a handler thread
        extra = socket.create_connection(("127.0.0.1", port))
        extra.settimeout(10)
        assert extra.recv(200).startswith(b"HTTP/1.0 503")
        extra.close()
        for sock in held:
            sock.close()
        deadline = time.time() + 10
        while request(s, "/index.json")[0] != 200:  # slots come back once the held ones end
            assert time.time() < deadline
            time.sleep(0.1)


# ---- SIGTERM -----------------------------------------------------------------------------------

def test_serve_cli_allow_host_and_sigterm_removes_the_snapshot(tmp_path_factory, tmp_path):
    path, _ = shared_store(tmp_path_factory)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = dict(os.environ, TMPDIR=str(tmp), PYTHONFAULTHANDLER="1")  # SIGABRT prints every thread's stack
    proc = subprocess.Popen([sys.executable, "-m", "neurostore.cli", "serve", "--store", str(path), "--port", "0",
                             "--allow-host", "nas.local"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), proc.stderr.read() if proc.poll() is not None else url
        snapshots = list(tmp.glob("neurostore-web-*"))
        assert len(snapshots) == 1 and (snapshots[0] / "snapshot.duckdb").exists()
        port = int(url.rstrip("/").rsplit(":", 1)[1])
        for host, status in (("nas.local", 200), ("evil.example", 421)):
            con = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            con.putrequest("GET", "/index.json", skip_host=True)
            con.putheader("Host", f"{host}:{port}")
            con.endheaders()
            assert con.getresponse().status == status
            con.close()
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(timeout=90) == 0
        except subprocess.TimeoutExpired:  # show where it hangs
            proc.send_signal(signal.SIGABRT)
            proc.wait()
            pytest.fail(f"serve did not exit after SIGTERM; snapshot removed: {not snapshots[0].exists()}; "
                        f"stacks:\n{proc.stderr.read()[:8000]}")
        assert not snapshots[0].exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

"""`neurostore serve`: a read-only local web app over a store.

    from neurostore.web import make_server
    server = make_server("./neurostore-store", port=8765)   # snapshot + locked DuckDB
    server.serve_forever()

Pages (each also as JSON: the same path with `.json` added, e.g. /neuron/m/l/3.json,
/search.json?q=striped, /sql.json?q=SELECT+1):

    /                                     models -> layers
    /model/<model>                        layers and the concept-by-depth plot
    /layer/<model>/<layer>                units of a layer
    /neuron/<model>/<layer>/<unit>        a neuron card (patches, concepts, summary, histogram)
    /patch/<patch_id>.png                 a patch thumbnail
    /image/<key>.png                      a whole probe image, read from the file `images.path` names
    /heatmap/<model>/<layer>/<unit>/<rank>.jpg   the unit's activation map over its top image `rank`
    /search?q=...&mode=all|exact|label|semantic|open   (all: every mode merged, the default)
    /compare, /audit                      findings tables
    /sql?q=...&name=value                 the SQL console (one SELECT/EXPLAIN, bound $name values)
    /sql.csv?q=..., /sql.parquet?q=...    its result as a file, under the same limits
    /query/<name>?param=value             a named query
    /tables                               the snapshot's tables

Every query runs on a read-only snapshot with file and network access disabled and the
configuration locked, with a time limit and a row cap (see neurostore.guard). The app adds what
a server open to a browser needs: console results capped in bytes as well as rows, under one
deadline that covers turning them into the page; a `Host` check (DNS rebinding); idle
connections closed after a timeout and a bound on the connections served at once; the snapshot
removed on SIGTERM as on Ctrl-C.
"""

from __future__ import annotations

import re
import sys
import threading
import time
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import NeurostoreError, UnknownLayer, UnknownModel
from ..guard import DEFAULT_MAX_ROWS, DEFAULT_TIMEOUT, ConsoleResult, QueryRefused, QueryTimeout, SafeDB
from ..signals import sigterm_exits
from . import data as D
from .render import PATCH_ID_RE, Links, jsonable, render, stylesheet, to_json

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
# Pages' own queries may read a whole layer; the console's row cap is for people.
PAGE_MAX_ROWS = 500_000
# Bytes as well as rows: one cell of repeat('x', 300000000) is 300 MB. A console cell above
# MAX_CELL_BYTES is cut in Arrow before any Python value of it exists, and rows stop once the
# result's JSON reaches the byte cap; both are reported with the result, like the row cap.
DEFAULT_MAX_BYTES = 4 * 1024**2
MAX_CELL_BYTES = 64 * 1024
ROW_CHUNK = 256  # rows converted at a time (the deadline and the byte cap are checked between)
# DuckDB holds a query's whole result (a 300 MB cell is 300 MB there and again in Arrow) before
# the byte cap can act, so console queries run at most this many at once; the rest wait their turn
# for up to the time limit.
MAX_CONSOLE_QUERIES = 2
# Pages are bounded by design (top-k patches, a layer's units); this only stops a bug or a
# pathological store from sending hundreds of MB.
MAX_PAGE_BYTES = 64 * 1024**2
# Connections: one that sends nothing for IDLE_TIMEOUT s is closed (half-open ones held a thread
# each forever); at most MAX_CONNECTIONS are served at once, the next get 503 at once.
IDLE_TIMEOUT = 30.0
MAX_CONNECTIONS = 32
# The Host names a browser may reach the app by, besides the bound address (DNS rebinding: a page
# on evil.example that resolves to 127.0.0.1 sends Host: evil.example).
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")

SQL_EXAMPLES = [
    ("Best concept of every unit, most common first",
     "SELECT model, layer, concept, count(*) AS n_units FROM scores WHERE rank = 0\n"
     "GROUP BY ALL ORDER BY n_units DESC LIMIT 20"),
    ("Which neurons encode a concept? (bound parameter)",
     "SELECT * FROM concept_neurons($concept, top_n := 20)", {"concept": "striped"}),
    ("Units per layer", "SELECT model, layer, count(*) AS units, round(avg(act_max), 3) AS mean_max\n"
                        "FROM units GROUP BY ALL ORDER BY model, layer"),
    ("Runs", "SELECT run_id, command, status, started_at FROM runs ORDER BY started_at DESC"),
]


NotFound = D.NoSuchPage


def _check_deadline(deadline: float) -> None:
    if time.perf_counter() > deadline:
        raise QueryTimeout("Query stopped at the time limit of this console while its result was turned into the "
                           "page (the limit covers both). Select fewer or smaller columns, or add a LIMIT.")


def _fixed_width(t: pa.DataType) -> bool:
    try:
        t.bit_width
    except ValueError:
        return False
    return True


def _cut_cells(table: pa.Table, max_cell: int, deadline: float) -> tuple[pa.Table, dict[int, dict[int, int]]]:
    """`table` with every cell above `max_cell` bytes cut in Arrow (text to its first `max_cell`
    characters, anything else to NULL, shown as a note), and {row: {column: original bytes}} of
    the cut cells. A column below the cap in total is passed through untouched."""
    cut: dict[int, dict[int, int]] = {}
    cols = []
    for j, col in enumerate(table.columns):
        if col.nbytes <= max_cell or _fixed_width(col.type):  # no cell can be big
            cols.append(col)
            continue
        if pa.types.is_string_view(col.type) or pa.types.is_binary_view(col.type):  # no slice kernels for views
            col = col.cast(pa.large_string() if pa.types.is_string_view(col.type) else pa.large_binary())
        t = col.type
        text = pa.types.is_string(t) or pa.types.is_large_string(t)
        blob = pa.types.is_binary(t) or pa.types.is_large_binary(t)
        if text or blob:
            sizes = pc.fill_null(pc.binary_length(col), 0).to_numpy()  # [rows]
        else:  # nested: the bytes each cell references
            sizes = np.zeros(len(col), np.int64)  # [rows]
            for i in range(len(col)):
                if i % 4096 == 0:
                    _check_deadline(deadline)
                sizes[i] = col.slice(i, 1).nbytes
        big = sizes > max_cell  # [rows]
        if not big.any():
            cols.append(col)
            continue
        short = pc.utf8_slice_codeunits(col, 0, max_cell) if text else pa.nulls(len(col), t)
        cols.append(pc.if_else(pa.array(big), short, col))
        for i in np.flatnonzero(big):
            cut.setdefault(int(i), {})[j] = int(sizes[i])
    return pa.Table.from_arrays(cols, names=table.column_names), cut


def result_dict(res: ConsoleResult, deadline: float, max_bytes: int = DEFAULT_MAX_BYTES,
                max_cell: int = MAX_CELL_BYTES) -> dict:
    """A console result as JSON-ready values, built chunk by chunk: stops with QueryTimeout at
    `deadline` (time.perf_counter()), and at `max_bytes` of JSON (`truncated`, `truncated_by`)."""
    table, cut = _cut_cells(res.table, max_cell, deadline)
    rows: list[list] = []
    used = 0
    truncated_by = "rows" if res.truncated else None
    i = 0
    while i < table.num_rows and truncated_by != "bytes":
        chunk = table.slice(i, ROW_CHUNK)
        while chunk.num_rows > 1 and chunk.nbytes > max_bytes:  # never more than the cap in Python at once
            chunk = chunk.slice(0, chunk.num_rows // 2)
        if chunk.nbytes > max_bytes:  # one row bigger than the whole cap
            truncated_by = "bytes"
            break
        columns = [c.to_pylist() for c in chunk.columns]  # by column: duplicate names stay apart
        for k, values in enumerate(zip(*columns)):
            _check_deadline(deadline)
            row = list(values)
            for j, n in cut.get(i + k, {}).items():
                row[j] = (row[j] + f"… [cut: {n:,} bytes]" if isinstance(row[j], str) else
                          f"[{n:,} bytes, above the {max_cell // 1024} KiB cell limit]")
            used += len(to_json(row)) + 1
            if used > max_bytes:
                truncated_by = "bytes"
                break
            rows.append(row)
        i += chunk.num_rows
    return {"sql": res.sql, "params": res.params, "named_query": res.named_query,
            "statement_type": res.statement_type, "columns": table.column_names, "rows": rows,
            "row_count": len(rows), "truncated": truncated_by is not None, "truncated_by": truncated_by,
            "cells_cut": sum(len(cut.get(r, {})) for r in range(len(rows))), "elapsed_s": round(res.elapsed, 4)}

class App:
    """Routes -> (template, data). The HTTP handler only translates."""

    def __init__(self, db: SafeDB, store_path: str = "", max_bytes: int = DEFAULT_MAX_BYTES):
        self.db = db
        self.max_bytes = max_bytes
        self._console_slots = threading.BoundedSemaphore(MAX_CONSOLE_QUERIES)
        self.store_path = store_path
        self.links = Links(static=False)
        self.find_store = D.snapshot_store(self.q, store_path or ".")
        self._routes = [
            (re.compile(r"^/$"), self.index),
            (re.compile(r"^/model/([^/]+)$"), self.model),
            (re.compile(r"^/layer/([^/]+)/([^/]+)$"), self.layer),
            (re.compile(r"^/neuron/([^/]+)/([^/]+)/(-?\d+)$"), self.neuron),
            (re.compile(r"^/search$"), self.search),
            (re.compile(r"^/(audit|compare)$"), self.findings),
            (re.compile(r"^/sql$"), self.sql),
            (re.compile(r"^/query/([^/]+)$"), self.named),
            (re.compile(r"^/tables$"), self.tables),
        ]

    def q(self, sql: str, params: dict | None = None):
        """The pages' own queries: same locked connection and deadline, a larger row cap."""
        return self.db.run(sql, params, max_rows=PAGE_MAX_ROWS)[0]

    # ---- dispatch ----

    def handle(self, path: str, query: dict[str, str]) -> tuple[int, str, bytes]:
        """(status, content type, body) for a GET."""
        if path == "/style.css":
            return 200, "text/css; charset=utf-8", stylesheet().encode()
        m = re.match(r"^/patch/([^/]+)\.png$", path)
        if m:
            return self.patch(unquote(m.group(1)))
        m = re.match(r"^/image/([0-9a-f]{16})\.png$", path)
        if m:
            png = D.image_png(self.q, m.group(1))
            return (200, "image/png", png) if png else (404, "text/plain; charset=utf-8", b"no such image")
        m = re.match(r"^/heatmap/([^/]+)/([^/]+)/(\d{1,9})/(\d{1,4})\.jpg$", path)
        if m:
            jpeg = D.heatmap_of(self.q, unquote(m.group(1)), unquote(m.group(2)), int(m.group(3)), int(m.group(4)))
            return (200, "image/jpeg", jpeg) if jpeg else (404, "text/plain; charset=utf-8", b"no such heatmap")
        m = re.match(r"^/sql\.(csv|parquet)$", path)
        if m:
            return self.download(query, m.group(1))
        if path == "/favicon.ico":
            return 204, "image/x-icon", b""
        as_json = path.endswith(".json")
        if as_json:
            path = path[: -len(".json")] or "/"
            if path == "/index":
                path = "/"
        for pattern, fn in self._routes:
            m = pattern.match(path)
            if m:
                break
        else:
            return self._error(404, "Page not found", f"No page at '{path}'. Start at / (the models).", as_json)
        try:
            status, template, payload = fn(query, *[unquote(g) for g in m.groups()])
        except QueryTimeout as e:
            return self._error(400, "Query stopped", str(e), as_json, "timeout")
        except QueryRefused as e:
            return self._error(400, "Query refused", str(e), as_json, "refused")
        except (NotFound, UnknownLayer, UnknownModel) as e:
            return self._error(404, "Not found", str(e), as_json)
        except NeurostoreError as e:
            return self._error(400, "Cannot show this page", str(e), as_json)
        if as_json:
            return self._capped(status, "application/json; charset=utf-8", to_json(payload).encode(), as_json)
        json_url = path.rstrip("/") + ".json" if path != "/" else "/index.json"
        qs = "&".join(f"{k}={v}" for k, v in query.items())  # only for the JSON link of this page
        if qs:
            from urllib.parse import urlencode

            json_url += "?" + urlencode(query)
        html = render(template, payload, self.links, json_url=json_url, store_path=self.store_path)
        return self._capped(status, "text/html; charset=utf-8", html.encode(), as_json)

    def _capped(self, status: int, ctype: str, body: bytes, as_json: bool):
        if len(body) <= MAX_PAGE_BYTES:
            return status, ctype, body
        return self._error(500, "Page too large", f"This page came to {len(body) / 1e6:.0f} MB, above the "
                           f"{MAX_PAGE_BYTES // 1024**2} MB limit of the web app; query it with 'neurostore sql'.",
                           as_json)

    def _error(self, status: int, title: str, msg: str, as_json: bool, kind: str = "error"):
        if as_json:
            return status, "application/json; charset=utf-8", to_json(
                {"ok": False, "error": msg, "error_type": kind}).encode()
        html = render("error.html", {"title": title, "error": msg}, self.links, store_path=self.store_path)
        return status, "text/html; charset=utf-8", html.encode()

    # ---- pages ----

    def index(self, query):
        return 200, "index.html", D.overview(self.q)

    def model(self, query, model):
        ov = D.overview(self.q)
        found = [m for m in ov["models"] if m["model"] == model]
        if not found:
            from ..errors import unknown

            raise NotFound(unknown("model", model, [m["model"] for m in ov["models"]], "See / for the models."))
        return 200, "model.html", {"model": found[0], "profile": D.depth_profile(self.q, model)}

    def layer(self, query, model, layer):
        return 200, "layer.html", D.layer_page(self.q, model, layer)

    def neuron(self, query, model, layer, unit):
        return 200, "neuron.html", D.neuron_card(self.q, model, layer, int(unit))

    def search(self, query):
        q = query.get("q", "")
        mode = query.get("mode", "all") or "all"
        try:
            out = D.search(self.q, q, mode, find_store=self.find_store)
        except (QueryTimeout, QueryRefused):
            raise
        except NeurostoreError as e:
            out = {"mode": mode, "q": q, "error": str(e)}
        return 200, "search.html", out

    def findings(self, query, kind):
        return 200, "findings.html", D.findings(self.q, kind)

    def _limits(self):
        return {"timeout_s": self.db.timeout, "max_rows": self.db.max_rows, "max_bytes": self.max_bytes,
                "max_cell_bytes": MAX_CELL_BYTES}

    def _console_page(self, sql, params, runner, named=None):
        import duckdb

        from ..queries import list_queries

        out = {"sql": sql, "param_values": params, "limits": self._limits(), "named_query": named,
               "queries": [q.to_dict() for q in list_queries().values()], "examples": SQL_EXAMPLES,
               "schema": D.schema_sidebar(),
               "param_names": [], "result": None, "error": None}
        if sql and not named:
            try:
                out["param_names"] = sorted({n for s in duckdb.extract_statements(sql) for n in s.named_parameters})
            except duckdb.Error:
                pass
        status = 200
        if sql:
            try:
                if not self._console_slots.acquire(timeout=self.db.timeout):
                    raise QueryTimeout(f"The console is busy with {MAX_CONSOLE_QUERIES} other queries and none "
                                       "finished within its time limit; retry in a moment.")
                try:
                    deadline = time.perf_counter() + self.db.timeout  # one deadline: the query and its conversion
                    out["result"] = result_dict(runner(), deadline, self.max_bytes)
                finally:
                    self._console_slots.release()
                out["ok"] = True
            except NeurostoreError as e:
                out["error"] = str(e)
                out["error_type"] = ("timeout" if isinstance(e, QueryTimeout) else
                                     "refused" if isinstance(e, QueryRefused) else "error")
                out["ok"] = False
                status = 400
        return status, "sql.html", out

    def sql(self, query):
        sql = query.get("q") or query.get("sql") or ""
        params = {k: v for k, v in query.items() if k not in ("q", "sql", "_size")}
        return self._console_page(sql, params, lambda: self.db.console(sql, params))

    def download(self, query, fmt: str):
        """The console's result as a CSV or Parquet file, under the console's limits (rows, time, bytes)."""
        import io

        import pyarrow.csv as pacsv
        import pyarrow.parquet as pq

        sql = query.get("q") or query.get("sql") or ""
        params = {k: v for k, v in query.items() if k not in ("q", "sql", "_size")}
        if not sql:
            return 400, "text/plain; charset=utf-8", b"Pass the query as q=SELECT ..., e.g. /sql.csv?q=SELECT+1\n"
        if not self._console_slots.acquire(timeout=self.db.timeout):
            return 503, "text/plain; charset=utf-8", b"The console is busy; retry in a moment.\n"
        try:
            table = self.db.console(sql, params).table
        except NeurostoreError as e:
            return 400, "text/plain; charset=utf-8", f"Error: {e}\n".encode()
        finally:
            self._console_slots.release()
        while table.num_rows > 1 and table.nbytes > self.max_bytes:  # the console's byte cap, in whole rows
            table = table.slice(0, table.num_rows // 2)
        buf = io.BytesIO()
        if fmt == "parquet":
            pq.write_table(table, buf)
            return 200, "application/vnd.apache.parquet", buf.getvalue()
        # CSV has no bytes or nested values: those columns are written as their JSON text.
        cols = [c if pa.types.is_primitive(c.type) or pa.types.is_string(c.type) else
                pa.array([to_json(v) for v in c.to_pylist()], pa.string()) for c in table.columns]
        pacsv.write_csv(pa.Table.from_arrays(cols, names=table.column_names), buf)
        return 200, "text/csv; charset=utf-8", buf.getvalue()

    def named(self, query, name):
        from ..queries import get_query

        q = get_query(name)  # UnknownQuery lists the valid names
        declared = {p.name for p in q.params}
        params = {k: v for k, v in query.items() if k in declared}
        missing = [p.name for p in q.params if p.required and not params.get(p.name)]
        runner = (lambda: self.db.named(name, params))
        status, tpl, out = self._console_page(q.sql, params, runner, named=q.to_dict())
        if missing and not params:
            # A bare /query/NAME shows the form instead of an error.
            out.update(error=None, result=None, ok=None)
            status = 200
        return status, tpl, out

    def tables(self, query):
        from ..schema import load_schemas

        schemas = load_schemas()
        counts = self.db.info.get("tables", {})
        skipped = self.db.info.get("skipped", {})
        extra = [r["table_name"] for r in D.rows(self.q, "SELECT table_name FROM information_schema.tables "
                                                        "WHERE table_schema = 'main' ORDER BY 1")]
        return 200, "tables.html", {"tables": [
            {"table": t, "rows": counts.get(t), "description": schemas[t].description if t in schemas else "",
             "skipped": skipped.get(t)} for t in extra]}

    def patch(self, patch_id: str):
        if not PATCH_ID_RE.match(patch_id):
            return 404, "text/plain; charset=utf-8", b"no such patch"
        t = self.q("SELECT thumbnail FROM patches WHERE patch_id = $p AND thumbnail IS NOT NULL LIMIT 1",
                   {"p": patch_id})
        if t.num_rows == 0:
            return 404, "text/plain; charset=utf-8", b"no such patch"
        return 200, "image/png", bytes(t.column(0)[0].as_py())


class _Handler(BaseHTTPRequestHandler):
    server_version = "neurostore"
    app: App  # set on the subclass made by make_server
    quiet = False
    timeout = IDLE_TIMEOUT  # socket timeout: an idle or half-open connection is closed (StreamRequestHandler)

    def do_GET(self):  # noqa: N802 (http.server's naming)
        self._respond(send_body=True)

    def do_HEAD(self):  # noqa: N802
        self._respond(send_body=False)

    def _method_not_allowed(self):
        self.send_response(HTTPStatus.METHOD_NOT_ALLOWED)
        self.send_header("Allow", "GET, HEAD")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_POST = do_PUT = do_DELETE = do_PATCH = _method_not_allowed  # noqa: N815 — read-only app

    def _respond(self, send_body: bool):
        parts = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        refusal = self.server.host_refusal(self.headers.get("Host"))
        try:
            if refusal:
                status, ctype, body = HTTPStatus.MISDIRECTED_REQUEST, "text/plain; charset=utf-8", refusal.encode()
            else:
                status, ctype, body = self.app.handle(parts.path, query)
        except Exception:  # a bug: show it in the log, answer 500, keep serving
            traceback.print_exc()
            status, ctype, body = 500, "text/plain; charset=utf-8", b"internal error (see the server log)"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "max-age=3600" if ctype == "image/png" else "no-store")
        # No scripts at all, and nothing loaded from elsewhere.
        self.send_header("Content-Security-Policy", "default-src 'self'; style-src 'self'; img-src 'self'; "
                                                    "script-src 'none'; object-src 'none'; frame-ancestors 'none'")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def log_message(self, fmt, *args):
        if not self.quiet:
            sys.stderr.write("%s - %s\n" % (self.address_string(), fmt % args))


def _split_host(header: str) -> tuple[str, str]:
    """'localhost:8765' -> ('localhost', '8765'), '[::1]:8765' -> ('[::1]', '8765'), 'a.b' -> ('a.b', '')."""
    h = header.strip().lower()
    if h.startswith("["):
        name, _, rest = h.partition("]")
        return name + "]", rest[1:] if rest.startswith(":") else rest
    name, _, port = h.partition(":")
    return name, port


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, addr, handler, app: App, allow_hosts=(), max_connections: int = MAX_CONNECTIONS):
        super().__init__(addr, handler)
        self.app = app
        bound = self.server_address[0]
        bound = f"[{bound}]" if ":" in bound else bound
        wildcard = bound in ("0.0.0.0", "[::]")
        self.allowed_hosts = {h.lower() for h in (*LOOPBACK_HOSTS, *(() if wildcard else (bound,)), *allow_hosts)}
        self._slots = threading.BoundedSemaphore(max_connections)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}/"

    def host_refusal(self, header: str | None) -> str | None:
        """Why a request's Host header is refused (None: it names this server). A browser sends the
        name it resolved, so a page of another domain rebound to this address is refused here."""
        port = self.server_address[1]
        name, given_port = _split_host(header or "")
        if name.rstrip(".") in self.allowed_hosts and (given_port == str(port) or (given_port, port) == ("", 80)):
            return None
        names = ", ".join(f"{h}:{port}" for h in sorted(self.allowed_hosts))
        return (f"Host {header!r} is not served here: this server answers to {names}. To reach it by another "
                f"name, start it with --allow-host NAME (neurostore serve --help).\n")

    def process_request(self, request, client_address):
        """A thread per connection, at most max_connections at once; one more is answered 503."""
        if not self._slots.acquire(blocking=False):
            try:
                request.settimeout(1.0)
                msg = b"Too many connections to neurostore serve; retry in a moment.\n"
                request.sendall(b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
                                b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(msg), msg))
            except OSError:
                pass
            self.shutdown_request(request)
            return
        release = _once(self._slots.release)
        try:
            threading.Thread(target=self._serve_connection, args=(request, client_address, release),
                             daemon=True).start()
        except BaseException:  # e.g. SIGTERM while the thread starts: the thread may or may not run
            release()
            self.shutdown_request(request)
            raise

    def _serve_connection(self, request, client_address, release):
        try:
            self.process_request_thread(request, client_address)
        finally:
            release()

    def server_close(self):
        super().server_close()
        self.app.db.close()


def make_server(store_path, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, timeout: float = DEFAULT_TIMEOUT,
                max_rows: int = DEFAULT_MAX_ROWS, quiet: bool = False, warm: bool = True, *,
                max_bytes: int = DEFAULT_MAX_BYTES, allow_hosts=(), idle_timeout: float = IDLE_TIMEOUT,
                max_connections: int = MAX_CONNECTIONS) -> Server:
    """A server over a read-only snapshot of the store at `store_path` (port 0 = any free port).
    It answers requests whose Host is a loopback name, the bound address or one of `allow_hosts`
    (names, e.g. a machine's name when binding 0.0.0.0), each with the port."""
    from ..store import Store

    store = Store.open(store_path, read_only=True)
    try:
        db = SafeDB.from_store(store, timeout=timeout, max_rows=max_rows)
    finally:
        store.close()
    app = App(db, str(store.path), max_bytes=max_bytes)
    handler = type("Handler", (_Handler,), {"app": app, "quiet": quiet, "timeout": idle_timeout})
    try:
        server = Server((host, port), handler, app, allow_hosts=allow_hosts, max_connections=max_connections)
    except BaseException:
        db.close()
        raise
    if warm:
        # MiniLM takes seconds to load; load it in the background so the first semantic search
        # (or similar_concepts() in the console) does not spend its time limit on it.
        threading.Thread(target=_warm_text_model, daemon=True).start()
    return server


def _warm_text_model():
    try:
        from ..sqlfuncs import embed_texts

        embed_texts(["warm up"])
    except Exception:  # semantic search will report the problem when used
        pass


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so that serve() shuts down as on Ctrl-C. A BaseException,
    like KeyboardInterrupt, so that socketserver's per-request `except Exception` cannot swallow it
    when the signal lands while a connection is being handed to its thread."""


def _once(fn):
    """`fn`, callable many times, run only the first."""
    lock, done = threading.Lock(), []

    def call():
        with lock:
            if not done:
                done.append(True)
                fn()
    return call


def serve(store_path, on_ready=None, **options) -> None:
    """Run the web app until Ctrl-C or SIGTERM; either way the snapshot is removed. `options` are
    make_server's (host, port, timeout, max_rows, max_bytes, allow_hosts, ...)."""
    try:
        # before the snapshot is made: SIGTERM while copying removes the copy too (off the main
        # thread SIGTERM keeps its default, and atexit does not run then)
        with sigterm_exits(_Terminated):
            server = make_server(store_path, **options)
            try:
                if on_ready:
                    on_ready(server)
                server.serve_forever()
            finally:
                server.server_close()
    except (KeyboardInterrupt, _Terminated):
        pass


__all__ = ["App", "Server", "make_server", "serve", "jsonable"]

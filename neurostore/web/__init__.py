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
    /search?q=...&mode=exact|semantic|open
    /compare, /audit                      findings tables
    /sql?q=...&name=value                 the SQL console (one SELECT/EXPLAIN, bound $name values)
    /query/<name>?param=value             a named query
    /tables                               the snapshot's tables

Every query runs on a read-only snapshot with file and network access disabled and the
configuration locked, with a time limit and a row cap (see neurostore.guard).
"""

from __future__ import annotations

import re
import sys
import threading
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

from ..errors import NeurostoreError, UnknownLayer, UnknownModel
from ..guard import DEFAULT_MAX_ROWS, DEFAULT_TIMEOUT, QueryRefused, QueryTimeout, SafeDB
from . import data as D
from .render import PATCH_ID_RE, Links, jsonable, render, stylesheet, to_json

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
# Pages' own queries may read a whole layer; the console's row cap is for people.
PAGE_MAX_ROWS = 500_000

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


class App:
    """Routes -> (template, data). The HTTP handler only translates."""

    def __init__(self, db: SafeDB, store_path: str = ""):
        self.db = db
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
            return status, "application/json; charset=utf-8", to_json(payload).encode()
        json_url = path.rstrip("/") + ".json" if path != "/" else "/index.json"
        qs = "&".join(f"{k}={v}" for k, v in query.items())  # only for the JSON link of this page
        if qs:
            from urllib.parse import urlencode

            json_url += "?" + urlencode(query)
        html = render(template, payload, self.links, json_url=json_url, store_path=self.store_path)
        return status, "text/html; charset=utf-8", html.encode()

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
        mode = query.get("mode", "exact") or "exact"
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
        return {"timeout_s": self.db.timeout, "max_rows": self.db.max_rows}

    def _console_page(self, sql, params, runner, named=None):
        import duckdb

        from ..queries import list_queries

        out = {"sql": sql, "param_values": params, "limits": self._limits(), "named_query": named,
               "queries": [q.to_dict() for q in list_queries().values()], "examples": SQL_EXAMPLES,
               "param_names": [], "result": None, "error": None}
        if sql and not named:
            try:
                out["param_names"] = sorted({n for s in duckdb.extract_statements(sql) for n in s.named_parameters})
            except duckdb.Error:
                pass
        status = 200
        if sql:
            try:
                res = runner()
                out["result"] = res.to_dict()
                out["result_rows"] = res.table.to_pylist()
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
        try:
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


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, addr, handler, app: App):
        super().__init__(addr, handler)
        self.app = app

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"

    def server_close(self):
        super().server_close()
        self.app.db.close()


def make_server(store_path, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, timeout: float = DEFAULT_TIMEOUT,
                max_rows: int = DEFAULT_MAX_ROWS, quiet: bool = False, warm: bool = True) -> Server:
    """A server over a read-only snapshot of the store at `store_path` (port 0 = any free port)."""
    from ..store import Store

    store = Store.open(store_path, read_only=True)
    try:
        db = SafeDB.from_store(store, timeout=timeout, max_rows=max_rows)
    finally:
        store.close()
    app = App(db, str(store.path))
    handler = type("Handler", (_Handler,), {"app": app, "quiet": quiet})
    try:
        server = Server((host, port), handler, app)
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


def serve(store_path, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, timeout: float = DEFAULT_TIMEOUT,
          max_rows: int = DEFAULT_MAX_ROWS, on_ready=None) -> None:
    """Run the web app until Ctrl-C."""
    server = make_server(store_path, host, port, timeout, max_rows)
    if on_ready:
        on_ready(server)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


__all__ = ["App", "Server", "make_server", "serve", "jsonable"]

"""The Anthropic client against a real local HTTP server speaking the Messages API: good replies,
malformed replies, rate limits with retry-after, server errors, timeouts, image blocks, and
the fallbacks without a key. The server thread handles a bounded number of requests and stops
by itself."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from neurostore import llm
from neurostore.errors import LLMError

FAST = llm.RetryPolicy(max_attempts=4, timeout=5.0, deadline=20.0, backoff=0.01, max_backoff=0.2)


def message(text: str) -> dict:
    return {"id": "msg_test", "type": "message", "role": "assistant",
            "content": [{"type": "text", "text": text}], "model": "claude-test",
            "stop_reason": "end_turn", "stop_sequence": None,
            "usage": {"input_tokens": 12, "output_tokens": 34}}


def error(kind: str, msg: str) -> dict:
    return {"type": "error", "error": {"type": kind, "message": msg}}


class MessagesServer:
    """POST /v1/messages answered from a script of (status, body, headers, delay) steps; the
    last step repeats. Records every request's headers and JSON body."""

    def __init__(self, script, max_requests: int = 20):
        self.script = list(script)
        self.requests: list[dict] = []
        self.max_requests = max_requests
        self._lock = threading.Lock()
        self._stop = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with outer._lock:
                    i = len(outer.requests)
                    outer.requests.append({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()},
                                           "json": json.loads(body)})
                    status, payload, headers, delay = outer.script[min(i, len(outer.script) - 1)]
                if delay:
                    time.sleep(delay)
                data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(data)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.timeout = 0.05
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self):
        deadline = time.monotonic() + 60  # never outlives a test run
        while not self._stop.is_set() and time.monotonic() < deadline:
            if len(self.requests) >= self.max_requests:
                break
            self.server.handle_request()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join(timeout=5)
        self.server.server_close()


def sent_key(request) -> str:
    """The key as the SDK sent it: x-api-key, or a bearer token (newer SDKs)."""
    h = request["headers"]
    return h.get("x-api-key") or h.get("authorization", "").removeprefix("Bearer ")


def ok(text, headers=None, delay=0.0):
    return (200, message(text), headers, delay)


def opts(server, **kw):
    return {"api_key": "sk-test", "base_url": server.url, "policy": kw.pop("policy", FAST), **kw}


# ---- vocabulary generation -----------------------------------------------------------------


def test_good_reply():
    with MessagesServer([ok('["feather", "Beak", "tree branch", "feather"]')]) as srv:
        words = llm.generate_concepts("garden birds", n=4, model="claude-test", **opts(srv))
    assert words == ["feather", "beak", "tree branch"]
    req = srv.requests[0]
    assert req["path"] == "/v1/messages"
    assert sent_key(req) == "sk-test"
    assert req["json"]["model"] == "claude-test"
    assert "garden birds" in req["json"]["messages"][0]["content"]


def test_malformed_reply_then_good():
    script = [ok("I'm sorry, I cannot comply with that request right now."),
              ok('```json\n["red", "blue", "green"]\n```')]
    with MessagesServer(script) as srv:
        words = llm.generate_concepts("colours", n=3, **opts(srv))
    assert words == ["red", "blue", "green"]
    assert len(srv.requests) == 2


def test_a_body_that_is_not_json_is_retried_then_one_error():
    """HTTP 200 with a broken JSON body (a proxy's page, a cut connection) was a JSONDecodeError
    traceback on the first try."""
    with MessagesServer([(200, '{"content": [{"type": "text", "text": "x"', None, 0.0),
                         ok('["fur", "whisker"]')]) as srv:
        assert llm.generate_concepts("cats", n=2, **opts(srv)) == ["fur", "whisker"]
    with MessagesServer([(200, "<html>gateway</html>", None, 0.0)]) as srv:
        with pytest.raises(LLMError, match=r"unreadable reply body .*Try again later \(requests went to http"):
            llm.generate_concepts("cats", n=2, **opts(srv))
    assert len(srv.requests) == FAST.max_attempts


def test_a_retry_after_past_the_deadline_stops_at_once():
    with MessagesServer([(429, error("rate_limit_error", "slow down"), {"retry-after": "3600"}, 0.0)]) as srv:
        with pytest.raises(LLMError, match="the server asks to wait 3600s, past the"):
            llm.generate_concepts("cats", n=2, sleep=lambda s: pytest.fail("slept"), **opts(srv))
    assert len(srv.requests) == 1


def test_rate_limit_respects_retry_after():
    waits: list[float] = []
    script = [(429, error("rate_limit_error", "slow down"), {"retry-after": "0.15"}, 0.0),
              ok('["wheel", "headlight"]')]
    with MessagesServer(script) as srv:
        words = llm.generate_concepts("cars", n=2,
                                      sleep=lambda s: (waits.append(s), time.sleep(s)), **opts(srv))
    assert words == ["wheel", "headlight"]
    assert waits == [pytest.approx(0.15)]
    assert len(srv.requests) == 2


def test_server_errors_exhaust_retries():
    with MessagesServer([(500, error("api_error", "boom"), None, 0.0)]) as srv:
        with pytest.raises(LLMError) as e:
            llm.generate_concepts("cars", n=5, **opts(srv))
    assert len(srv.requests) == FAST.max_attempts
    assert "HTTP 500" in str(e.value) and "4 attempt" in str(e.value)


def test_overloaded_then_good():
    script = [(529, error("overloaded_error", "busy"), None, 0.0), ok('["sail", "mast"]')]
    with MessagesServer(script) as srv:
        assert llm.generate_concepts("boats", n=2, **opts(srv)) == ["sail", "mast"]


def test_timeout_then_retry():
    policy = llm.RetryPolicy(max_attempts=3, timeout=0.4, deadline=20, backoff=0.01)
    script = [ok('["late"]', delay=2.0), ok('["fur", "whisker"]')]
    with MessagesServer(script) as srv:
        words = llm.generate_concepts("cats", n=2, **opts(srv, policy=policy))
    # the slow reply was abandoned at the timeout: had it been awaited, the answer would be ["late"]
    assert words == ["fur", "whisker"]
    assert len(srv.requests) == 2


def test_auth_error_is_not_retried():
    with MessagesServer([(401, error("authentication_error", "invalid x-api-key"), None, 0.0)]) as srv:
        with pytest.raises(LLMError) as e:
            llm.generate_concepts("cars", n=5, **opts(srv))
    assert len(srv.requests) == 1
    assert "401" in str(e.value) and "ANTHROPIC_API_KEY" in str(e.value)


def test_deadline_bounds_total_time():
    policy = llm.RetryPolicy(max_attempts=50, timeout=5, deadline=0.5, backoff=0.2, max_backoff=0.2)
    with MessagesServer([(503, error("api_error", "down"), None, 0.0)]) as srv:
        with pytest.raises(LLMError):
            llm.generate_concepts("cars", n=5, **opts(srv, policy=policy))
    # 50 attempts allowed, but the deadline stopped the retries: a 0.2 s backoff fits a few in 0.5 s
    assert 1 <= len(srv.requests) < 10


def test_base_url_from_environment(monkeypatch):
    with MessagesServer([ok('["leaf"]')]) as srv:
        monkeypatch.setenv("ANTHROPIC_BASE_URL", srv.url)
        monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-env")
        assert llm.generate_concepts("trees", n=1, policy=FAST) == ["leaf"]
    assert sent_key(srv.requests[0]) == "sk-env"


# ---- unit summaries ----------------------------------------------------------------------


def _png(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return buf.getvalue()


def test_summarise_unit_sends_image_blocks():
    pngs = [_png("red"), _png("blue")]
    reply = 'Summary: "Detects red striped circles." It also fires on ...'
    with MessagesServer([ok(reply)]) as srv:
        sentence, by = llm.summarise_unit([("circle", 1.2, 0.98), ("red", 0.8, 0.9)], pngs,
                                          model="claude-test", return_source=True, **opts(srv))
    assert sentence == "Detects red striped circles."
    assert by == "claude-test"
    content = srv.requests[0]["json"]["messages"][0]["content"]
    images = [b for b in content if b["type"] == "image"]
    assert [base64.b64decode(b["source"]["data"]) for b in images] == pngs
    assert all(b["source"]["media_type"] == "image/png" for b in images)
    text = [b for b in content if b["type"] == "text"][0]["text"]
    assert "circle" in text and "0.98" in text


def test_a_failing_api_turns_the_summaries_into_templates_not_a_failed_dissect(monkeypatch):
    """One unit's LLMError aborted the whole dissect (no scores, no explanations committed)."""
    import pyarrow as pa

    from neurostore.explain import summarise

    scores = pa.table({"unit": [0, 0, 1], "rank": [0, 1, 0], "scorer": ["patch"] * 3,
                       "concept": ["circle", "red", "star"], "score": [1.0, 0.5, 0.9], "confidence": [0.9, 0.2, 0.8]})
    said = []
    with MessagesServer([ok("Fires on red circles."), (401, error("authentication_error", "bad key"), None, 0.0)]) as srv:
        monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test")
        monkeypatch.setenv("ANTHROPIC_BASE_URL", srv.url)
        out = summarise(scores, "patch", model="claude-test", log=said.append)
    assert out[(0, "patch")] == ("Fires on red circles.", "claude-test")
    assert out[(1, "patch")][1] == "template" and "star" in out[(1, "patch")][0]
    assert len(said) == 1 and "summaries stopped at unit 1" in said[0] and "401" in said[0]


def test_summarise_unit_retries_empty_reply():
    with MessagesServer([ok(""), ok("Fires on star shapes.")]) as srv:
        assert llm.summarise_unit(["star"], **opts(srv)) == "Fires on star shapes."
    assert len(srv.requests) == 2


# ---- without a key ----------------------------------------------------------------------


def test_no_key_warns_and_falls_back(monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    with pytest.warns(llm.NoAPIKeyWarning, match="ANTHROPIC_API_KEY"):
        s, by = llm.summarise_unit([("circle", 1.0), ("ring", 0.5), ("red", 0.2)],
                                   return_source=True)
    assert by == "template"
    assert s == "Responds mostly to circle, and also to ring and red."
    with pytest.raises(LLMError, match="ANTHROPIC_API_KEY"):
        llm.make_client()


# ---- parsing -----------------------------------------------------------------------------


@pytest.mark.parametrize("text,expected", [
    ('["a cat", "Dog"]', ["a cat", "dog"]),
    ('Here you go:\n```json\n["fur", "tail"]\n```\nEnjoy!', ["fur", "tail"]),
    ("1. fur\n2. tail\n3) paw", ["fur", "tail", "paw"]),
    ("- fur\n* tail\n• whisker", ["fur", "tail", "whisker"]),
    ("Concepts:\nfur, tail, paw", ["fur", "tail", "paw"]),
    ('[{"concept": "fur"}, {"name": "tail"}]', ["fur", "tail"]),
    ('{"concepts": ["fur", "tail"]}', ["fur", "tail"]),
    ('["fur", "tail", "pa', ["fur", "tail", "pa"]),            # truncated reply keeps whole items
    ('["Café au lait", "jalapeño", "crème brûlée", "× sign"]', ["café au lait", "jalapeño", "crème brûlée"]),
    ("- feather\n- beak\n- tree branch\nHope that helps!", ["feather", "beak", "tree branch"]),   # the sign-off was a concept
])
def test_parse_concepts_tolerates_formats(text, expected):
    assert llm.parse_concepts(text) == expected


@pytest.mark.parametrize("text", ["", "   ", "{}", "[1, 2, 3]",
                                  "This is a long sentence that explains nothing useful at all."])
def test_parse_concepts_rejects_garbage(text):
    with pytest.raises(ValueError):
        llm.parse_concepts(text, n=8)


def test_parse_concepts_rejects_too_few():
    with pytest.raises(ValueError, match="only 2"):
        llm.parse_concepts('["a1", "b2"]', n=20)

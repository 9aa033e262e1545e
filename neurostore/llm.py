"""Anthropic Messages API client for the two things neurostore asks an LLM: a concept vocabulary
for a described domain, and a one-sentence summary of a unit's explanation.

The API is reached through the `anthropic` SDK. Its own retries are switched off
(`max_retries=0`) and replaced by one loop here, so that every failure mode is handled the same
way and within one overall deadline:

- 429, 408, 409, 5xx, 529 and timeouts / connection errors are retried with exponential backoff
  (a `retry-after` header, when sent, sets the wait; waits are capped by `max_backoff`);
- a reply that does not parse into what was asked for is retried (the model is asked again);
- 400/401/403/404 are not retried: they will not get better;
- after `max_attempts` attempts or `deadline` seconds, `LLMError` says what happened last.

Configuration: `api_key` / ANTHROPIC_API_KEY, `base_url` / ANTHROPIC_BASE_URL (tests point it
at a local server), `model` / NEUROSTORE_LLM_MODEL (default claude-sonnet-4-6). Without a key,
callers warn (`warn_no_key`) and use their built-in fallback instead of failing. `anthropic` is
imported where a request is made: it takes seconds to import, and most runs never call an LLM.
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence, TypeVar

from .errors import LLMError

DEFAULT_MODEL = "claude-sonnet-4-6"  # claude-sonnet-4-5 is deprecated in the SDK (EOL 2026-11-30)
T = TypeVar("T")


class NoAPIKeyWarning(UserWarning):
    """ANTHROPIC_API_KEY is not set; a built-in fallback was used instead of the LLM."""


def default_model() -> str:
    return os.environ.get("NEUROSTORE_LLM_MODEL") or DEFAULT_MODEL


def have_api_key(api_key: Optional[str] = None) -> bool:
    return bool(api_key or os.environ.get("ANTHROPIC_API_KEY"))


def warn_no_key(task: str, fallback: str) -> None:
    warnings.warn(
        f"ANTHROPIC_API_KEY is not set, so no LLM was asked when {task}; using {fallback} "
        "instead. Set ANTHROPIC_API_KEY (and optionally ANTHROPIC_BASE_URL) to use the "
        "Anthropic API.",
        NoAPIKeyWarning,
        stacklevel=3,
    )


@dataclass
class RetryPolicy:
    """How hard to try. Tests shrink the delays; the defaults suit the real API."""

    max_attempts: int = 5
    timeout: float = 60.0        # seconds for one request
    deadline: float = 300.0      # seconds for all attempts together, waits included
    backoff: float = 1.0         # first wait; doubles each retry, with jitter
    max_backoff: float = 30.0    # no single wait is longer (also caps retry-after)


# --------------------------------------------------------------------------------------------
# the call loop


def make_client(api_key: Optional[str] = None, base_url: Optional[str] = None):
    """An `anthropic.Anthropic` with SDK retries off (this module retries)."""
    import anthropic

    key = api_key or os.environ.get("ANTHROPIC_API_KEY")
    if not key:
        raise LLMError("ANTHROPIC_API_KEY is not set. Export it (and ANTHROPIC_BASE_URL for a "
                       "proxy or a local server), or pass api_key=.")
    url = base_url or os.environ.get("ANTHROPIC_BASE_URL") or None
    return anthropic.Anthropic(api_key=key, base_url=url, max_retries=0)


_RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504, 529}


def _retry_after(err: Exception) -> Optional[float]:
    """Seconds the server asked us to wait, from retry-after-ms or retry-after (seconds)."""
    resp = getattr(err, "response", None)
    headers = getattr(resp, "headers", None)
    if headers is None:
        return None
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return max(0.0, float(value) * scale)
        except ValueError:
            # An HTTP date instead of seconds: rare for this API; fall back to our own backoff.
            return None
    return None


class _BadReply(Exception):
    """The reply arrived but does not contain what was asked for."""


def _reply_text(message: Any) -> str:
    parts = []
    for block in getattr(message, "content", None) or []:
        if getattr(block, "type", None) == "text":
            parts.append(block.text)
    return "".join(parts)


def call(
    request: dict[str, Any],
    parse: Callable[[str], T],
    *,
    api_key: Optional[str] = None,
    base_url: Optional[str] = None,
    policy: Optional[RetryPolicy] = None,
    client: Any = None,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Send one Messages API request (kwargs of `messages.create`) and return `parse(text)`,
    retrying as described in the module doc. `parse` raises ValueError for a bad reply."""
    import anthropic

    policy = policy or RetryPolicy()
    client = client or make_client(api_key, base_url)
    start = time.monotonic()
    last = "no attempt made"
    for attempt in range(1, policy.max_attempts + 1):
        remaining = policy.deadline - (time.monotonic() - start)
        if remaining <= 0:
            break
        wait: Optional[float] = None
        try:
            message = client.with_options(timeout=min(policy.timeout, remaining)).messages.create(
                **request)
            text = _reply_text(message)
        except anthropic.APIStatusError as e:
            status = getattr(e, "status_code", None)
            last = f"HTTP {status}: {_short(e)}"
            if status not in _RETRY_STATUS and not (status is not None and status >= 500):
                raise LLMError(f"The Anthropic API refused the request ({last}). Check "
                               "ANTHROPIC_API_KEY, the model name and ANTHROPIC_BASE_URL.") from None
            wait = _retry_after(e)
        except anthropic.APITimeoutError:
            last = f"timed out after {min(policy.timeout, remaining):.1f}s"
        except anthropic.APIConnectionError as e:
            last = f"connection failed: {_short(e)}"
        except (ValueError, anthropic.APIResponseValidationError) as e:   # a 200 whose body is not the API's JSON
            last = f"unreadable reply body ({_short(e)})"
        else:
            try:
                return parse(text)
            except ValueError as e:
                snippet = " ".join(text.split())[:120]
                last = f"malformed reply ({e}): {snippet!r}"
        if attempt == policy.max_attempts:
            break
        if wait is not None and time.monotonic() - start + wait >= policy.deadline:
            last += f"; the server asks to wait {wait:.0f}s, past the {policy.deadline:.0f}s deadline"
            break   # its Retry-After: retrying sooner only asks to be refused again
        if wait is None:
            wait = policy.backoff * (2 ** (attempt - 1)) * (0.5 + random.random() / 2)
        wait = min(wait, policy.max_backoff)
        if time.monotonic() - start + wait >= policy.deadline:
            last += f"; the next retry (in {wait:.1f}s) would pass the {policy.deadline:.0f}s deadline"
            break
        sleep(wait)
    url = base_url or os.environ.get("ANTHROPIC_BASE_URL")
    raise LLMError(
        f"The Anthropic API did not give a usable reply after {attempt} attempt(s) in "
        f"{time.monotonic() - start:.1f}s; last: {last.rstrip('.')}. Try again later"
        + (f" (requests went to {url}, from ANTHROPIC_BASE_URL or base_url)." if url else ".")
    )


def _short(e: Exception) -> str:
    return " ".join(str(e).split())[:160]


# --------------------------------------------------------------------------------------------
# parsing replies

_FENCE = re.compile(r"```[a-zA-Z0-9_-]*\s*\n?(.*?)```", re.S)
_BULLET = re.compile(r"^\s*(?:[-*•·+>]+|\(?\d{1,5}[.):\]]|\(?[a-zA-Z][.)])\s+")
_LETTERS = "a-z\u00df-\u00f6\u00f8-\u024f"   # lowercase Latin letters, accented too ('café', 'jalapeño')
_L = _LETTERS + "0-9"
_ALLOWED = re.compile(rf"^[{_L}][{_L} '&/-]*[{_L})]$|^[{_L}]$")
MAX_CONCEPT_WORDS = 5
MAX_CONCEPT_CHARS = 60


def _clean_item(item: Any) -> Optional[str]:
    if isinstance(item, dict):
        for k in ("concept", "name", "word", "term", "label"):
            if isinstance(item.get(k), str):
                item = item[k]
                break
        else:
            return None
    if not isinstance(item, str):
        return None
    s = _BULLET.sub("", item.strip())
    s = s.strip().strip("\"'`“”‘’").strip().rstrip(",;.").strip().strip("\"'`“”‘’").lower()
    s = " ".join(s.split())
    if not s or len(s) > MAX_CONCEPT_CHARS or len(s.split()) > MAX_CONCEPT_WORDS:
        return None
    if not _ALLOWED.match(s) or not re.search(rf"[{_LETTERS}]", s):
        return None
    return s


def _is_prose(line: str) -> bool:
    """A sentence rather than a list item: three words or more and sentence punctuation at the
    end ('Hope that helps!', 'I cannot help with that.')."""
    words = _BULLET.sub("", line.strip()).split()
    return line.strip()[-1:] in ".!?" and len(words) >= 3


def parse_concepts(text: str, n: Optional[int] = None) -> list[str]:
    """Concepts from a reply: a JSON list (of strings or of {"concept": ...} objects), possibly
    inside a code fence or surrounded by prose; else a bulleted / numbered / comma-separated
    list. Items are lowercased and deduplicated; prose-like items are dropped. Raises ValueError
    when nothing usable is found, or when fewer than a quarter of the n asked for survive (a
    reply that is mostly garbage is not trusted)."""
    if not text or not text.strip():
        raise ValueError("empty reply")
    body = text
    fenced = _FENCE.findall(text)
    if fenced:
        body = max(fenced, key=len)
    items: Optional[list[Any]] = None
    lb, rb = body.find("["), body.rfind("]")
    if lb != -1 and rb > lb:
        try:
            data = json.loads(body[lb : rb + 1])
            if isinstance(data, list):
                items = data
        except json.JSONDecodeError:
            items = None
    if items is None:
        try:
            data = json.loads(body)
            if isinstance(data, dict):
                for v in data.values():
                    if isinstance(v, list):
                        items = v
                        break
        except json.JSONDecodeError:
            pass
    if items is None:
        # Not JSON: a list, one per line, or one line separated by commas. A truncated JSON
        # array ('["a", "b", "c') lands here too, and its complete items are kept.
        lines = [ln for ln in body.replace("[", "\n").replace("]", "\n").splitlines() if ln.strip()]
        items = []
        for ln in lines:
            if ln.strip().endswith(":") or _is_prose(ln):
                continue  # a heading ("Here are the concepts:") or a sentence, not a concept
            items.extend(ln.split(",") if ln.count(",") >= 1 else [ln])
    out: list[str] = []
    seen: set[str] = set()
    for it in items:
        c = _clean_item(it)
        if c and c not in seen:
            seen.add(c)
            out.append(c)
    if not out:
        raise ValueError("no concepts found")
    if n is not None and len(out) < max(1, n // 4):
        raise ValueError(f"only {len(out)} usable concepts of {n} asked for")
    return out[:n] if n is not None else out


def parse_sentence(text: str) -> str:
    """One sentence from a reply: fences, quotes and labels such as 'Summary:' removed."""
    if not text or not text.strip():
        raise ValueError("empty reply")
    s = " ".join(_FENCE.sub(lambda m: m.group(1), text).split())
    s = re.sub(r"^(?:summary|description|sentence|answer)\s*:\s*", "", s, flags=re.I)
    s = s.strip().strip("\"'“”")
    m = re.match(r"(.+?[.!?])[\"'”’]?(?:\s|$)", s)
    if m:
        s = m.group(1).strip("\"'“”")
    if len(s) < 8 or not re.search(r"[A-Za-z]{3}", s):
        raise ValueError("no sentence found")
    if len(s) > 400:
        raise ValueError("reply is not one sentence")
    return s if s[-1] in ".!?" else s + "."


# --------------------------------------------------------------------------------------------
# the two tasks


def vocabulary_prompt(domain: str, n: int) -> str:
    return (
        f"List {n} distinct visual concepts for this domain: {domain}\n\n"
        "The list will be used to explain what individual neurons of an image classifier "
        "detect, so cover what can be seen in images of the domain: objects and their parts, "
        "materials, textures, patterns, colours, shapes and typical scenes or backgrounds. "
        "Each concept is a lowercase English word or short phrase of at most 3 words, without "
        "numbering or explanation. Answer with a JSON array of strings only, for example "
        '["feather", "striped", "tree branch"].'
    )


def generate_concepts(domain: str, n: int = 200, model: Optional[str] = None, **client_options: Any) -> list[str]:
    """Ask the model for n concepts for `domain`; a list of lowercase unique concepts (it may be
    shorter than n when the model gives fewer, but never under n/4). client_options: call()'s
    api_key, base_url, policy, client and sleep."""
    request = {
        "model": model or default_model(),
        "max_tokens": int(min(32_000, 256 + 12 * n)),
        "system": "You write concept vocabularies for neural network interpretability. "
                  "You answer with JSON only.",
        "messages": [{"role": "user", "content": vocabulary_prompt(domain, n)}],
    }
    return call(request, lambda t: parse_concepts(t, n), **client_options)


def _concept_lines(concepts_with_scores: Iterable[Any]) -> list[str]:
    lines = []
    for item in concepts_with_scores:
        if isinstance(item, str):
            lines.append(f"- {item}")
        elif isinstance(item, dict):
            parts = [str(item.get("concept"))]
            for k in ("score", "confidence"):
                if item.get(k) is not None:
                    parts.append(f"{k} {float(item[k]):.3g}")
            lines.append("- " + ", ".join(parts))
        else:
            concept, *rest = item
            parts = [str(concept)] + [f"{name} {float(v):.3g}"
                                      for name, v in zip(("score", "confidence"), rest)]
            lines.append("- " + ", ".join(parts))
    return lines


def template_summary(concepts_with_scores: Sequence[Any]) -> str:
    """The fallback summary when no LLM is available: names the top concepts in order."""
    names = []
    for item in concepts_with_scores:
        if isinstance(item, str):
            names.append(item)
        elif isinstance(item, dict):
            names.append(str(item.get("concept")))
        else:
            names.append(str(item[0]))
    if not names:
        return "No concept explains this unit."
    if len(names) == 1:
        return f"Responds mostly to {names[0]}."
    rest = names[1:4]
    return f"Responds mostly to {names[0]}, and also to {', '.join(rest[:-1]) + ' and ' if len(rest) > 1 else ''}{rest[-1]}."


def summarise_unit(
    concepts_with_scores: Sequence[Any],
    patch_pngs: Optional[Sequence[bytes]] = None,
    model: Optional[str] = None,
    *,
    return_source: bool = False,
    max_images: int = 8,
    **client_options: Any,
) -> Any:
    """One sentence describing what a unit detects, from its top concepts — (concept, score[,
    confidence]) tuples, dicts with those keys, or plain strings — and optionally the PNG bytes
    of its top activating patches, sent as base64 image blocks (at most `max_images`).

    Without an API key: warns and returns `template_summary(...)`. With `return_source=True`
    returns (sentence, by) where `by` is the model id or 'template' (explanations.summary_by).
    client_options: call()'s api_key, base_url, policy, client and sleep.
    """
    model = model or default_model()
    if not have_api_key(client_options.get("api_key")) and client_options.get("client") is None:
        warn_no_key("summarising a unit", "a template sentence")
        s = template_summary(concepts_with_scores)
        return (s, "template") if return_source else s
    content: list[dict[str, Any]] = []
    pngs = list(patch_pngs or [])[:max_images]
    for png in pngs:
        content.append({
            "type": "image",
            "source": {"type": "base64", "media_type": "image/png",
                       "data": base64.b64encode(png).decode("ascii")},
        })
    prompt = (
        "A neuron of an image classifier was matched against a concept vocabulary. Its best "
        "concepts, best first, with the scorer's raw score and a confidence in [0, 1]:\n"
        + "\n".join(_concept_lines(concepts_with_scores))
        + ("\n\nThe images above are the image patches where it fires most." if pngs else "")
        + "\n\nDescribe in one short sentence what this neuron detects. Answer with the "
          "sentence only."
    )
    content.append({"type": "text", "text": prompt})
    request = {
        "model": model,
        "max_tokens": 200,
        "messages": [{"role": "user", "content": content}],
    }
    s = call(request, parse_sentence, **client_options)
    return (s, model) if return_source else s

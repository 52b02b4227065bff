"""A small client for OpenAI-compatible chat servers, standard library only.

Both papers rewrite captions with a language model: the ultrasound-CLIP paper (§4.1) translated and
shortened the Chinese CURD captions with Qwen3-8B; EchoCare-CLIP wrote captions from metadata with
Qwen3-4B-Instruct served by vLLM. Any server that speaks OpenAI's `POST {base}/chat/completions`
works: vLLM, Ollama, llama.cpp's server, hosted APIs.

- `complete` sends one request and retries with exponential backoff (or the server's
  Retry-After, capped at max_backoff) on HTTP errors, timeouts, dropped connections, malformed
  JSON and replies the caller rejects (an empty one, say). 401/403/404, a refused connection and
  an unknown host stop the whole run at once: every other request would fail the same way.
- `ReplyCache` is an append-only JSONL file of answers keyed by a hash of the request body, so a
  killed run resumes without repeating a call and a rerun makes none.
- `run_requests` keeps `concurrency` requests in flight with threads and shows a progress bar
  with the rate and the error count.

The API key travels only in the Authorization header: it is never printed, cached or put into an
error message.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field

from tqdm import tqdm

# Worth another try: the server is busy, overloaded or restarting.
RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
# The server refuses this client (key, model or URL): every request would fail the same way.
FATAL_STATUS = {401: "the API key was refused (set it in the environment variable --api-key-env "
                     "names)",
                403: "the API key may not use this model or endpoint",
                404: "no such endpoint or model (check --endpoint, which should end in /v1, and "
                     "--model)"}


class LLMError(RuntimeError):
    """A request failed after all its retries, or cannot be made (a bad setting); the message
    says why."""


class FatalLLMError(LLMError):
    """The server refuses every request (bad key, model or URL) or cannot be reached: stop the
    run."""


class BadReply(ValueError):
    """A reply that is not the expected JSON, or whose text the caller rejected."""


@dataclass
class ChatConfig:
    endpoint: str                   # OpenAI-style base URL, e.g. http://127.0.0.1:8000/v1
    model: str
    api_key: str | None = field(default=None, repr=False)   # never printed
    timeout: float = 120.0          # seconds per request
    retries: int = 5                # tries after the first one
    backoff: float = 1.0            # first wait in seconds; doubles after every failed try
    max_backoff: float = 60.0

    def __post_init__(self):
        # checked here, once, instead of failing every request (an endpoint without http://
        # gives "unknown url type" on each try; retries=-1 would send nothing at all)
        parts = urllib.parse.urlsplit(self.endpoint)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise LLMError(f"--endpoint must be an http(s) base URL such as "
                           f"http://127.0.0.1:8000/v1, got {self.endpoint!r}")
        if not (self.timeout > 0 and self.retries >= 0 and self.backoff >= 0):
            raise LLMError(f"--timeout must be > 0, --retries and --backoff >= 0; got "
                           f"{self.timeout}, {self.retries} and {self.backoff}")

    @property
    def url(self) -> str:
        return self.endpoint.rstrip("/") + "/chat/completions"


def request_body(model: str, messages: list, **params) -> dict:
    """The JSON body of a chat completion; parameters that are None are left out, so servers
    that do not know one (OpenAI's API rejects `repetition_penalty`) never see it."""
    return {"model": model, "messages": messages,
            **{k: v for k, v in params.items() if v is not None}}


def request_key(body: dict) -> str:
    """The cache key: SHA-256 of the body as canonical JSON (the endpoint and key are not in it,
    so moving the same model to another server keeps the cache)."""
    text = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def reply_text(payload) -> str:
    """choices[0].message.content of a chat completion."""
    try:
        content = payload["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError) as e:
        raise BadReply(f"no choices[0].message.content in the reply ({type(e).__name__}: {e})") \
            from None
    if not isinstance(content, str):
        raise BadReply(f"message content is {type(content).__name__}, not text")
    return content


# A server on this machine is reached directly even when http_proxy is set for outside traffic
# (common on clusters): urllib would send every request to the proxy unless no_proxy names it.
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _urlopen(req: urllib.request.Request, timeout: float):
    if urllib.parse.urlsplit(req.full_url).hostname in LOOPBACK:
        return _DIRECT.open(req, timeout=timeout)
    return urllib.request.urlopen(req, timeout=timeout)


def post_chat(cfg: ChatConfig, body: dict) -> str:
    """One POST; the reply's text. Raises urllib/socket errors or BadReply."""
    headers = {"Content-Type": "application/json"}
    if cfg.api_key:
        headers["Authorization"] = f"Bearer {cfg.api_key}"
    req = urllib.request.Request(cfg.url, data=json.dumps(body).encode("utf-8"),
                                 headers=headers, method="POST")
    with _urlopen(req, cfg.timeout) as resp:
        raw = resp.read()
    try:
        payload = json.loads(raw)
    except ValueError:
        raise BadReply(f"the reply is not JSON: {raw[:80]!r}") from None
    return reply_text(payload)


def _http_error(e: urllib.error.HTTPError) -> str:
    try:
        detail = e.read(300).decode("utf-8", "replace").strip()
    except OSError:
        detail = ""
    return f"HTTP {e.code} {e.reason}" + (f": {detail}" if detail else "")


def _retry_after(e: urllib.error.HTTPError) -> float:
    """Seconds a 429/503 reply asks the client to wait (Retry-After in seconds), else 0."""
    try:
        return max(0.0, float(e.headers.get("Retry-After", 0)))
    except (TypeError, ValueError):   # an HTTP date: fall back to the exponential backoff
        return 0.0


class Stats:
    """Thread-safe counters shown on the progress bar."""

    def __init__(self):
        self.lock, self.retries, self.failed = threading.Lock(), 0, 0

    def add(self, name: str) -> None:
        with self.lock:
            setattr(self, name, getattr(self, name) + 1)


def _unreachable(cfg: ChatConfig, e: Exception) -> str | None:
    """Why no request can reach the server (nothing listens on the port, or the host name does
    not resolve), else None. Retrying those only delays the error by a minute; timeouts and
    resets stay retried, as a busy or restarting server gives them."""
    reason = getattr(e, "reason", e)  # URLError wraps the socket's error
    if isinstance(reason, ConnectionRefusedError):
        return f"cannot connect to {cfg.endpoint} (connection refused): is the server running?"
    if isinstance(reason, socket.gaierror):
        host = urllib.parse.urlsplit(cfg.endpoint).hostname
        return f"cannot connect to {cfg.endpoint} (host {host} not found): check --endpoint"
    return None


def complete(cfg: ChatConfig, body: dict, check=None, stats: Stats | None = None) -> str:
    """The reply text of one request, after `check(text)` (which raises BadReply to reject it)
    passes. Retries with exponential backoff; raises LLMError after the last try, FatalLLMError
    at once on 401/403/404 and when the server cannot be reached at all."""
    error, asked_wait = "", 0.0
    for attempt in range(cfg.retries + 1):
        if attempt:
            if stats is not None:
                stats.add("retries")
            wait = cfg.backoff * 2 ** (attempt - 1) * random.uniform(0.75, 1.0)  # jitter
            time.sleep(min(cfg.max_backoff, max(wait, asked_wait)))
        try:
            text = post_chat(cfg, body)
            if check is not None:
                check(text)
            return text
        except urllib.error.HTTPError as e:
            error, asked_wait = _http_error(e), _retry_after(e)
            if e.code in FATAL_STATUS:
                raise FatalLLMError(f"{cfg.url}: {error}; {FATAL_STATUS[e.code]}") from None
            if e.code not in RETRY_STATUS and e.code < 500:
                raise LLMError(error) from None   # this request is wrong; asking again won't help
        except (OSError, http.client.HTTPException) as e:
            # URLError (refused, DNS), timeouts, resets, TLS errors: all OSErrors
            unreachable = _unreachable(cfg, e)
            if unreachable:
                raise FatalLLMError(unreachable) from None
            error = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
        except BadReply as e:
            error = str(e)
    raise LLMError(f"gave up after {cfg.retries + 1} tries; last error: {error}")


class ReplyCache:
    """Append-only JSONL of {"key", "reply"}: one line per answer, flushed as it arrives. A line
    cut short by a killed run is skipped on reading."""

    def __init__(self, path):
        self.path, self.lock, self.replies, self.torn = str(path), threading.Lock(), {}, 0
        try:
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    self._load(line)
        except FileNotFoundError:
            pass
        self.file = None

    def _load(self, line: str) -> None:
        try:
            rec = json.loads(line)
            self.replies[rec["key"]] = rec["reply"]
        except (ValueError, KeyError, TypeError):
            self.torn += 1

    def get(self, key: str):
        return self.replies.get(key)

    def put(self, key: str, reply: str) -> None:
        line = json.dumps({"key": key, "reply": reply}, ensure_ascii=False) + "\n"
        with self.lock:
            if self.file is None:   # the output's folder may not exist yet
                os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
                self.file = open(self.path, "a", encoding="utf-8")
                # a torn last line from a killed run: start on a fresh line
                if self.file.tell() and not _ends_with_newline(self.path):
                    self.file.write("\n")
            self.file.write(line)
            self.file.flush()
            self.replies[key] = reply

    def close(self) -> None:
        with self.lock:
            if self.file is not None:
                self.file.close()
                self.file = None


def _ends_with_newline(path: str) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, 2)
        return f.read(1) == b"\n"


def run_requests(cfg: ChatConfig, bodies: dict, cache: ReplyCache, check=None,
                 concurrency: int = 8, progress: bool = True) -> tuple[dict, dict, Stats]:
    """Send every body of `bodies` ({key: body}) that the cache lacks, `concurrency` at a time.
    Returns ({key: reply} for all answered keys, {key: error} for failed ones, stats).
    Each answer goes into the cache the moment it arrives."""
    todo = [k for k in bodies if cache.get(k) is None]
    errors, stats = {}, Stats()

    def one(key):
        text = complete(cfg, bodies[key], check, stats)
        cache.put(key, text)

    bar = tqdm(total=len(todo), unit="req", disable=not progress, desc="refine", dynamic_ncols=True)
    pool = ThreadPoolExecutor(max_workers=max(1, concurrency))
    try:
        futures = {pool.submit(one, k): k for k in todo}
        for fut in as_completed(futures):
            try:
                fut.result()
            except FatalLLMError:
                raise
            except LLMError as e:
                errors[futures[fut]] = str(e)
                stats.add("failed")
            bar.update()
            bar.set_postfix(errors=stats.failed, retries=stats.retries, refresh=False)
    finally:
        # on Ctrl-C or a fatal error, queued requests are dropped instead of sent
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    replies = {k: cache.get(k) for k in bodies if cache.get(k) is not None}
    return replies, errors, stats

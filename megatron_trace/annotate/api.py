"""Annotator backed by any OpenAI-compatible Chat Completions endpoint.

- One key switches to a self-hosted model: with `base_url` pointing anywhere but OpenAI and
  `model` unset, the model is the first one the server lists at `GET {base_url}/models`, and no
  key is sent unless `api_key_env` names one. On OpenAI's URL the defaults are gpt-4o-mini and
  OPENAI_API_KEY.
- The API key is read, at call time, from the environment variable whose *name* is configured
  (`api_key_env`). The key itself is never stored on the object, put in a repr, a config dump,
  a log line or an error message (messages are passed through `_redact`).
- Bounded concurrency (a thread pool of `max_concurrency`), per-request `timeout_s`, retries with
  exponential backoff and jitter on connection errors, timeouts, 429 and 5xx.
- An on-disk cache keyed by the SHA-256 of the request body (model, messages, parameters; not
  the key), so a rerun pays nothing. Only successfully parsed replies are cached.
- Counters: calls, cache hits, retries, prompt/completion tokens, and failures by kind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .base import Annotation, AnnotationRequest, build_messages, parse_reply

__all__ = ["ApiAnnotator", "ApiAnnotatorConfig"]

log = logging.getLogger(__name__)


OPENAI_URL = "https://api.openai.com/v1"
OPENAI_DEFAULTS = {"model": "gpt-4o-mini", "api_key_env": "OPENAI_API_KEY"}


@dataclass(frozen=True)
class ApiAnnotatorConfig:
    base_url: str = OPENAI_URL
    model: str | None = None  # None: gpt-4o-mini on OpenAI, else the one the server lists
    # The variable's NAME; the key never enters the config. None: OPENAI_API_KEY on OpenAI, else
    # no key. A name given explicitly must be set (a missing key is a counted failure).
    api_key_env: str | None = None
    max_concurrency: int = 8
    timeout_s: float = 60.0
    max_retries: int = 3
    backoff_s: float = 1.0  # first retry delay; doubles each retry, with +-50% jitter
    temperature: float = 0.0
    max_tokens: int = 256
    cache_dir: str | None = None
    coverage_cap: float = 0.25

    @property
    def on_openai(self) -> bool:
        return "api.openai.com" in self.base_url

    @property
    def key_env(self) -> str | None:
        if self.api_key_env:
            return self.api_key_env
        return OPENAI_DEFAULTS["api_key_env"] if self.on_openai else None

    def __post_init__(self) -> None:
        if self.max_concurrency < 1 or self.max_retries < 0 or self.timeout_s <= 0:
            raise ValueError(
                "annotate.api: max_concurrency >= 1, max_retries >= 0 and timeout_s > 0 are required, got "
                f"{self.max_concurrency}, {self.max_retries}, {self.timeout_s}"
            )


class _Retryable(Exception):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class ApiAnnotator:
    name = "api"

    def __init__(self, config: ApiAnnotatorConfig):
        self.config = config
        self.counters: Counter = Counter()
        self._lock = threading.Lock()
        self._model = config.model or (OPENAI_DEFAULTS["model"] if config.on_openai else None)
        if config.cache_dir:
            os.makedirs(config.cache_dir, exist_ok=True)

    def __repr__(self) -> str:  # never shows the key (it is not even stored)
        c = self.config
        return f"ApiAnnotator(base_url={c.base_url!r}, model={self._model or c.model!r}, api_key_env={c.key_env!r})"

    # ------------------------------------------------------------------ helpers

    def _headers(self) -> dict:
        """Content type, and the bearer key when the config names a variable (it must be set)."""
        env = self.config.key_env
        if env is None:
            return {"Content-Type": "application/json"}
        key = os.environ.get(env, "")
        if not key:
            raise _Retryable("http_error", f"environment variable {env} is not set")
        return {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}

    def _redact(self, text: str) -> str:
        key = os.environ.get(self.config.key_env) if self.config.key_env else None
        return text.replace(key, "***") if key else text

    def model(self) -> str:
        """The model to ask: the configured one, or the first the server lists (asked once)."""
        with self._lock:
            if self._model:
                return self._model
            url = self.config.base_url.rstrip("/") + "/models"
            try:
                request = urllib.request.Request(url, headers=self._headers(), method="GET")
                with urllib.request.urlopen(request, timeout=self.config.timeout_s) as resp:
                    self._model = json.loads(resp.read())["data"][0]["id"]
            except _Retryable:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure here is "the server did not say"
                raise _Retryable("http_error", f"annotate.api.model is unset and GET {url} did not name a model "
                                               f"({type(exc).__name__}); set annotate.api.model") from None
            log.info("annotator: %s serves %s", self.config.base_url, self._model)
            return self._model

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] += n

    def _body(self, req: AnnotationRequest) -> dict:
        return {
            "model": self.model(),
            "messages": build_messages(req, self.config.coverage_cap),
            "temperature": self.config.temperature,
            "max_tokens": self.config.max_tokens,
        }

    def _cache_path(self, body: dict) -> str | None:
        if not self.config.cache_dir:
            return None
        digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        return os.path.join(self.config.cache_dir, f"{digest}.json")

    def _post(self, body: dict) -> str:
        """One HTTP call; returns the assistant message content or raises _Retryable/ValueError."""
        url = self.config.base_url.rstrip("/") + "/chat/completions"
        request = urllib.request.Request(
            url,
            data=json.dumps(body).encode(),
            headers=self._headers(),
            method="POST",
        )
        self._count("calls")
        try:
            with urllib.request.urlopen(request, timeout=self.config.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            kind = "http_error"
            if exc.code == 429 or exc.code >= 500:
                raise _Retryable(kind, f"HTTP {exc.code}") from None
            raise ValueError(f"http_error:HTTP {exc.code}") from None
        except TimeoutError as exc:
            raise _Retryable("timeout", f"timed out: {exc}") from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, (TimeoutError, socket.timeout)):
                raise _Retryable("timeout", "timed out") from None
            raise _Retryable("http_error", f"connection error: {exc.reason}") from None
        except (ConnectionError, OSError) as exc:
            raise _Retryable("http_error", f"connection error: {exc}") from None
        try:
            payload = json.loads(raw)
            content = payload["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise ValueError("invalid_json:response is not a Chat Completions object") from None
        usage = payload.get("usage") or {}
        if isinstance(usage, dict):
            for k in ("prompt_tokens", "completion_tokens"):
                if isinstance(usage.get(k), int):
                    self._count(k, usage[k])
        return content

    def _one(self, req: AnnotationRequest) -> Annotation:
        if not req.segments:
            return Annotation.failed("no_segments")
        try:
            body = self._body(req)
        except _Retryable as exc:  # the model could not be discovered (or the key is missing)
            log.warning("annotation request failed: %s", self._redact(str(exc)))
            return Annotation.failed(exc.kind)
        path = self._cache_path(body)
        if path and os.path.exists(path):
            try:
                with open(path) as f:
                    content = json.load(f)["content"]
                self._count("cache_hits")
                return parse_reply(content, req)
            except (OSError, ValueError, KeyError):
                pass  # a corrupt cache entry is just a miss
        delay = self.config.backoff_s
        for attempt in range(self.config.max_retries + 1):
            try:
                content = self._post(body)
                break
            except _Retryable as exc:
                if attempt == self.config.max_retries:
                    log.warning("annotation request failed after %d attempts: %s", attempt + 1, self._redact(str(exc)))
                    return Annotation.failed(exc.kind)
                self._count("retries")
                time.sleep(delay * random.uniform(0.5, 1.5))
                delay *= 2
            except ValueError as exc:
                kind, _, msg = str(exc).partition(":")
                log.warning("annotation request failed: %s", self._redact(msg))
                return Annotation.failed(kind if kind in ("http_error", "invalid_json") else "error")
        ann = parse_reply(content, req)
        if ann.ok and path:
            tmp = f"{path}.{threading.get_ident()}.tmp"
            with open(tmp, "w") as f:
                json.dump({"content": content}, f)
            os.replace(tmp, path)
        return ann

    def _safe_one(self, req: AnnotationRequest) -> Annotation:
        try:
            return self._one(req)
        except Exception as exc:  # noqa: BLE001 - an annotator never raises into training
            log.warning("annotation error: %s", self._redact(f"{type(exc).__name__}: {exc}"))
            return Annotation.failed("error")

    def annotate(self, requests: Sequence[AnnotationRequest]) -> list[Annotation]:
        with ThreadPoolExecutor(max_workers=self.config.max_concurrency) as pool:
            out = list(pool.map(self._safe_one, requests))
        for a in out:
            self._count(f"failure/{a.failure}" if a.failure else "ok")
        return out

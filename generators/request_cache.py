"""An on-disk cache of model requests, and a backend wrapper that uses it.

Each item of a batch is one entry, keyed by the sha256 of
``(model identity, method, semantic parameters, prompt[, continuation | candidates])``.
Batch size, concurrency, device and threads are not part of the key. Sampling
with a seed is cached (same seed, same samples, by the backend contract);
sampling without a seed (``seed=None`` at ``temperature > 0``) is never cached.

The store is one SQLite file (default ``$THRESHER_CACHE_DIR/requests.sqlite``)
in WAL mode with a busy timeout and retries, so several worker processes can
read and write it at once. Values are JSON (arrays as base64 of their bytes):
nothing is unpickled from disk.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from thresher.generators.base import (
    BackendKind,
    Completion,
    ContinuationScore,
    ContinuationTopK,
    Generation,
    Message,
    ModelBackend,
    SamplingParams,
    TopK,
)
from thresher.generators.embedded import cache_dir

#: bump when the stored value format or a backend's semantics change
CACHE_VERSION = 1


def default_cache_path() -> Path:
    """``$THRESHER_CACHE_DIR/requests.sqlite`` (``~/.cache/thresher/requests.sqlite``)."""
    return cache_dir() / "requests.sqlite"


def request_key(identity: str, method: str, params: dict[str, Any], item: Any) -> str:
    """sha256 hex of the canonical JSON of one request item."""
    payload = json.dumps(
        {"v": CACHE_VERSION, "model": identity, "method": method, "params": params, "item": item},
        sort_keys=True, ensure_ascii=False, separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode("utf-8", "surrogatepass")).hexdigest()


class RequestCache:
    """A key -> JSON value store in SQLite, safe across threads and processes."""

    def __init__(self, path: str | Path | None = None, retries: int = 20) -> None:
        self.path = Path(path).expanduser() if path else default_cache_path()
        self.retries = retries
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._pid = -1

    def _connect(self) -> sqlite3.Connection:
        # a connection must not cross a fork: reopen in a child process
        if self._conn is None or self._pid != os.getpid():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False, isolation_level=None)
            self._retry(lambda: conn.execute("PRAGMA journal_mode=WAL"))
            conn.execute("PRAGMA synchronous=NORMAL")
            self._retry(lambda: conn.execute(
                "CREATE TABLE IF NOT EXISTS requests (key TEXT PRIMARY KEY, value TEXT NOT NULL, created REAL)"
            ))
            self._conn, self._pid = conn, os.getpid()
        return self._conn

    def _retry(self, fn: Callable[[], Any]) -> Any:
        delay = 0.05
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except sqlite3.OperationalError as exc:
                msg = str(exc).lower()
                if attempt == self.retries or ("locked" not in msg and "busy" not in msg):
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def get_many(self, keys: Sequence[str]) -> dict[str, Any]:
        """The stored values of those keys that are present (decoded JSON)."""
        found: dict[str, Any] = {}
        unique = list(dict.fromkeys(keys))
        with self._lock:
            conn = self._connect()
            for a in range(0, len(unique), 500):
                chunk = unique[a:a + 500]
                sql = f"SELECT key, value FROM requests WHERE key IN ({','.join('?' * len(chunk))})"
                for k, v in self._retry(lambda: conn.execute(sql, chunk).fetchall()):
                    found[k] = json.loads(v)
        return found

    def put_many(self, items: dict[str, Any]) -> None:
        """Store values (JSON-able) under their keys, in one transaction."""
        if not items:
            return
        now = time.time()
        rows = [(k, json.dumps(v, ensure_ascii=False), now) for k, v in items.items()]

        def write() -> None:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany("INSERT OR REPLACE INTO requests (key, value, created) VALUES (?, ?, ?)", rows)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

        with self._lock:
            conn = self._connect()
            self._retry(write)

    def __len__(self) -> int:
        with self._lock:
            conn = self._connect()
            return int(self._retry(lambda: conn.execute("SELECT COUNT(*) FROM requests").fetchone()[0]))

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None


# ------------------------------------------------------------------ value codecs


def _array_to_json(a: np.ndarray) -> dict[str, Any]:
    a = np.ascontiguousarray(a)
    return {"dtype": a.dtype.str, "shape": list(a.shape), "b64": base64.b64encode(a.tobytes()).decode()}


def _array_from_json(d: dict[str, Any]) -> np.ndarray:
    return np.frombuffer(base64.b64decode(d["b64"]), dtype=np.dtype(d["dtype"])).reshape(d["shape"]).copy()


def _topk_to_json(top: TopK) -> dict[str, Any]:
    return {"ids": _array_to_json(top.ids), "logprobs": _array_to_json(top.logprobs)}


def _topk_from_json(d: dict[str, Any] | list) -> TopK:
    if isinstance(d, list):  # stored as [[[id, logprob], ...] per position] before TopK (k: the widest)
        return TopK.from_pairs(d, max((len(pos) for pos in d), default=0))
    return TopK(_array_from_json(d["ids"]), _array_from_json(d["logprobs"]))


def _forced_topk_to_json(r: ContinuationTopK) -> dict[str, Any]:
    return {"prompt_ids": _array_to_json(r.prompt_ids), "token_ids": _array_to_json(r.token_ids),
            "topk": _topk_to_json(r.topk), "truncated": bool(r.truncated)}


def _forced_topk_from_json(d: dict[str, Any]) -> ContinuationTopK:
    return ContinuationTopK(prompt_ids=_array_from_json(d["prompt_ids"]), token_ids=_array_from_json(d["token_ids"]),
                            topk=_topk_from_json(d["topk"]), truncated=d["truncated"])


def _completions_to_json(g: Generation) -> list[dict[str, Any]]:
    return [
        {
            "text": c.text, "token_ids": list(c.token_ids), "finish_reason": c.finish_reason,
            "top_logprobs": None if c.top_logprobs is None else _topk_to_json(c.top_logprobs),
        }
        for c in g.completions
    ]


def _generation_from_json(prompt: str, v: list[dict[str, Any]]) -> Generation:
    return Generation(prompt=prompt, completions=[
        Completion(
            text=c["text"], token_ids=list(c["token_ids"]), finish_reason=c["finish_reason"],
            top_logprobs=None if c["top_logprobs"] is None else _topk_from_json(c["top_logprobs"]),
        )
        for c in v
    ])


# ------------------------------------------------------------------ the wrapper


class CachedBackend(ModelBackend):
    """Wraps a backend: serves cached items, sends only the misses to it, as one batch.

    It offers the :class:`ModelBackend` interface only; a stage that needs
    something else of the model must get it added to that interface.

    ``model_calls`` counts calls made to the inner backend, ``cache_hits`` the
    items served from the cache, ``items_computed`` the items the inner backend
    computed. Identical items within one batch are computed once.
    """

    def __init__(self, inner: ModelBackend, cache: RequestCache | str | Path | None = None) -> None:
        self.inner = inner
        self.cache = cache if isinstance(cache, RequestCache) else RequestCache(cache)
        self.identity = inner.identity
        self.model_calls = 0
        self.cache_hits = 0
        self.items_computed = 0
        self._lock = threading.Lock()

    @property
    def tokenizer(self) -> Any:
        return self.inner.tokenizer

    def apply_chat_template(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        return self.inner.apply_chat_template(messages, add_generation_prompt)

    @property
    def kind(self) -> BackendKind:  # type: ignore[override]
        return self.inner.kind

    @property
    def context_length(self) -> int | None:
        return self.inner.context_length

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return self.inner.count_tokens(texts)

    def close(self) -> None:
        """Close the inner backend (shared with every other user of it) and the cache file."""
        self.inner.close()
        self.cache.close()

    def _cached(
        self,
        method: str,
        params: dict[str, Any],
        items: Sequence[Any],
        compute: Callable[[list[int]], list[Any]],
        encode: Callable[[Any], Any],
        decode: Callable[[int, Any], Any],
    ) -> list[Any]:
        """Look every item up; ``compute(indices of misses)`` once; store; decode all."""
        keys = [request_key(self.identity, method, params, it) for it in items]
        stored = self.cache.get_many(keys)
        first_of: dict[str, int] = {}
        for i, k in enumerate(keys):
            if k not in stored:
                first_of.setdefault(k, i)
        misses = list(first_of.values())
        with self._lock:
            self.cache_hits += sum(1 for k in keys if k in stored)
        if misses:
            fresh = compute(misses)
            new = {keys[i]: encode(r) for i, r in zip(misses, fresh)}
            self.cache.put_many(new)
            stored.update(new)
            with self._lock:
                self.model_calls += 1
                self.items_computed += len(misses)
        return [decode(i, stored[k]) for i, k in enumerate(keys)]

    # ------------------------------------------------------------------ methods

    @staticmethod
    def _sampling_key(params: SamplingParams) -> dict[str, Any] | None:
        """Cache-key parameters of a sampling request; None when not reproducible."""
        fields = params.cache_fields()
        if params.temperature <= 0:
            fields.update(seed=None, top_p=None)  # greedy: neither matters
        elif params.seed is None:
            return None
        return fields

    def generate(self, prompts: Sequence[str], params: SamplingParams) -> list[Generation]:
        key = self._sampling_key(params)
        if key is None:
            with self._lock:
                self.model_calls += 1
                self.items_computed += len(prompts)
            return self.inner.generate(prompts, params)
        return self._cached(
            "generate", key, list(prompts),
            lambda idx: self.inner.generate([prompts[i] for i in idx], params),
            _completions_to_json,
            lambda i, v: _generation_from_json(prompts[i], v),
        )

    def chat(self, conversations: Sequence[Sequence[Message]], params: SamplingParams) -> list[Generation]:
        key = self._sampling_key(params)
        convs = [[dict(m) for m in c] for c in conversations]
        if key is None:
            with self._lock:
                self.model_calls += 1
                self.items_computed += len(convs)
            return self.inner.chat(convs, params)
        gens = self._cached(
            "chat", key, convs,
            lambda idx: self.inner.chat([convs[i] for i in idx], params),
            lambda g: {"prompt": g.prompt, "completions": _completions_to_json(g)},
            lambda i, v: _generation_from_json(v["prompt"], v["completions"]),
        )
        return gens

    def continuation_logprobs(
        self, prompts: Sequence[str], continuations: Sequence[str], max_tokens: int | None = None
    ) -> list[ContinuationScore]:
        if len(prompts) != len(continuations):
            raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
        items = [[p, c] for p, c in zip(prompts, continuations)]
        return self._cached(
            "continuation_logprobs", {"max_tokens": max_tokens}, items,
            lambda idx: self.inner.continuation_logprobs(
                [prompts[i] for i in idx], [continuations[i] for i in idx], max_tokens),
            lambda s: {"token_ids": list(s.token_ids), "token_logprobs": [float(x) for x in s.token_logprobs],
                       "truncated": bool(s.truncated)},
            lambda i, v: ContinuationScore(v["token_ids"], v["token_logprobs"], v["truncated"]),
        )

    def continuation_topk(
        self, prompts: Sequence[str], continuations: Sequence[str], k: int, max_tokens: int | None = None,
    ) -> list[ContinuationTopK]:
        if len(prompts) != len(continuations):
            raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
        items = [[p, c] for p, c in zip(prompts, continuations)]
        return self._cached(
            "continuation_topk", {"k": int(k), "max_tokens": max_tokens}, items,
            lambda idx: self.inner.continuation_topk(
                [prompts[i] for i in idx], [continuations[i] for i in idx], k, max_tokens),
            _forced_topk_to_json,
            lambda i, v: _forced_topk_from_json(v),
        )

    def next_token_logprobs(self, prompts: Sequence[str], candidates: Sequence[str]) -> np.ndarray:
        cands = list(candidates)
        rows = self._cached(
            "next_token_logprobs", {"candidates": cands}, list(prompts),
            lambda idx: list(self.inner.next_token_logprobs([prompts[i] for i in idx], cands)),
            lambda row: [float(x) for x in np.asarray(row, dtype=np.float64)],
            lambda i, v: np.asarray(v, dtype=np.float64),
        )
        return np.stack(rows) if rows else np.zeros((0, len(cands)), dtype=np.float64)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return self.inner.embed([])
        rows = self._cached(
            "embed", {}, list(texts),
            lambda idx: list(self.inner.embed([texts[i] for i in idx])),
            lambda row: _array_to_json(np.asarray(row, dtype=np.float32)),
            lambda i, v: _array_from_json(v),
        )
        return np.stack(rows).astype(np.float32)

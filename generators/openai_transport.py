"""HTTP to an OpenAI-compatible server, for the ``openai`` backend: one client, retries, a private loop.

- **Client**: one ``httpx.AsyncClient`` per process, at most ``max_concurrency``
  requests in flight (an ``asyncio.Semaphore``), each with ``timeout_s``.
- **Retries** (``tenacity``): connect/read errors, timeouts, HTTP 429 and 5xx are
  transient and retried ``max_retries`` times with exponential backoff (0.5 s,
  1 s, 2 s, ... up to 20 s, 10 % jitter); a ``Retry-After`` header in seconds
  replaces the computed wait. Exhausted retries raise one :class:`ModelError`
  naming the attempts and the last error. Any other 4xx is permanent: one
  :class:`ServerError` at once, carrying the server's own message.
- **Blocking calls from anywhere**: the coroutines run on a private event loop
  in a daemon thread, never on the caller's loop, so the backend's blocking
  methods work from a Prefect task (whose loop is running), a Dask worker
  thread or plain code. A forked child (or an unpickled copy) builds its own
  loop and client on first use.
- **The key**: read from the environment variable ``api_key_env`` when the client is
  made, never stored or pickled; its value is redacted from the process's logs
  (:mod:`thresher.schemas.secrets`).
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
from concurrent.futures import Future
from typing import Any, Coroutine, TypeVar

import httpx
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt, wait_exponential

from thresher.generators.base import ModelError
from thresher.schemas.secrets import install_log_redaction, register_secret_env

T = TypeVar("T")


class ServerError(ModelError):
    """The server answered with an HTTP error status; ``status`` and ``message`` are its own."""

    def __init__(self, status: int, message: str, url: str) -> None:
        self.status = status
        self.message = message
        self.url = url
        kind = "transient, retries exhausted" if status == 429 or status >= 500 else "permanent"
        super().__init__(f"{url} answered HTTP {status} ({kind}): {message}")


class TransientError(Exception):
    """One failed attempt that is worth retrying; ``retry_after`` is the server's header, if any."""

    def __init__(self, detail: str, retry_after: str | None = None) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


def server_message(resp: httpx.Response) -> str:
    """The error text a server put in its response (OpenAI, FastAPI or plain)."""
    try:
        body = resp.json()
    except ValueError:
        return resp.text.strip()[:2000] or resp.reason_phrase
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            msg = err.get("message") or err.get("detail") or err.get("msg")
            if msg:
                return str(msg)[:2000]
        elif isinstance(err, str):
            return err[:2000]
        if "detail" in body:
            return str(body["detail"])[:2000]
    return str(body)[:2000]


class LoopThread:
    """A private asyncio loop in a daemon thread; blocking callers submit coroutines to it."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self.thread:
            coro.close()
            raise RuntimeError("a blocking backend method was called from the backend's own event loop")
        fut: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result()

    def close(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=5)
        if not self.loop.is_running():
            self.loop.close()


class Transport:
    """JSON requests to one server (see the module docstring). Picklable; closed by :meth:`close`."""

    backoff_base_s: float = 0.5
    backoff_max_s: float = 20.0

    def __init__(
        self,
        base_url: str,
        *,
        api_key_env: str | None = None,
        timeout_s: float = 120.0,
        max_concurrency: int = 8,
        max_retries: int = 4,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url
        self.api_key_env = api_key_env  # the variable's name: the key itself is read when the client is made
        if api_key_env:
            register_secret_env([api_key_env])
            install_log_redaction()
        self.timeout_s = timeout_s
        self.max_concurrency = max_concurrency
        self.max_retries = max_retries
        self._transport = transport
        self._reset()
        self._lock = threading.Lock()

    def _reset(self) -> None:
        """Forget the loop, client and loop-bound locks (after a fork, an unpickling, or close)."""
        self._pid = -1
        self._loop: LoopThread | None = None
        self._client: httpx.AsyncClient | None = None
        self._sem: asyncio.Semaphore | None = None
        self._locks: dict[str, asyncio.Lock] = {}

    # ------------------------------------------------------------------ the private loop

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the private loop and wait for its result (from any thread)."""
        with self._lock:
            if self._loop is None or self._pid != os.getpid():  # first use, or a forked child
                self._reset()
                self._loop, self._pid = LoopThread(f"thresher-openai-{id(self):x}"), os.getpid()
            loop = self._loop
        return loop.run(coro)

    def lock(self, name: str) -> asyncio.Lock:
        """An ``asyncio.Lock`` of the current loop, one per name (call from a coroutine on it)."""
        return self._locks.setdefault(name, asyncio.Lock())

    def _http(self) -> tuple[httpx.AsyncClient, asyncio.Semaphore]:
        """The client and semaphore, created on (and bound to) the private loop."""
        if self._client is None or self._sem is None:
            key = os.environ.get(self.api_key_env) if self.api_key_env else None
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            n = self.max_concurrency
            self._client = httpx.AsyncClient(
                base_url=self.base_url,
                headers=headers,
                timeout=httpx.Timeout(self.timeout_s, connect=min(10.0, self.timeout_s)),
                limits=httpx.Limits(max_connections=n, max_keepalive_connections=n),
                transport=self._transport,
            )
            self._sem = asyncio.Semaphore(n)
        return self._client, self._sem

    # ------------------------------------------------------------------ requests

    def _wait(self, state: RetryCallState) -> float:
        """Seconds before the next attempt: the server's Retry-After, else exponential with jitter."""
        exc = state.outcome.exception() if state.outcome else None
        retry_after = getattr(exc, "retry_after", None)
        if retry_after:
            try:
                return min(float(retry_after), self.backoff_max_s)
            except ValueError:
                pass
        delay = wait_exponential(multiplier=self.backoff_base_s, max=self.backoff_max_s)(state)
        return delay * (1.0 + 0.1 * random.random())

    async def request(
        self, method: str, path: str, payload: dict[str, Any] | None = None, *,
        retries: int | None = None, retry_server_errors: bool = True,
    ) -> Any:
        """One JSON request, retried on transient failures; the parsed JSON body.

        ``retry_server_errors=False`` turns 429/5xx into an immediate
        :class:`ServerError` (a probe whose failure is an answer).
        """
        retries = self.max_retries if retries is None else retries
        retrying = AsyncRetrying(
            stop=stop_after_attempt(retries + 1), wait=self._wait,
            retry=retry_if_exception_type(TransientError), reraise=True,
        )
        try:
            return await retrying(self._attempt, method, path, payload, retry_server_errors)
        except TransientError as exc:
            raise ModelError(
                f"{method} {self.base_url}{path} failed after {retries + 1} attempts "
                f"(max_retries={retries}); last error: {exc}"
            ) from None

    async def _attempt(self, method: str, path: str, payload: dict[str, Any] | None, retry_server_errors: bool) -> Any:
        client, sem = self._http()
        url = f"{self.base_url}{path}"
        try:
            async with sem:
                resp = await client.request(method, path, json=payload)
        except httpx.TransportError as exc:  # connect, read/write, timeouts, protocol
            raise TransientError(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__) from exc
        if resp.status_code < 400:
            try:
                return resp.json()
            except ValueError as exc:
                raise ModelError(f"{url} returned a non-JSON body: {resp.text[:500]!r}") from exc
        transient = resp.status_code == 429 or resp.status_code >= 500
        if not transient or not retry_server_errors:
            raise ServerError(resp.status_code, server_message(resp), url)
        raise TransientError(f"HTTP {resp.status_code}: {server_message(resp)}", resp.headers.get("retry-after"))

    async def post(self, path: str, payload: dict[str, Any], **kw: Any) -> Any:
        return await self.request("POST", path, payload, **kw)

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Close the HTTP client and stop the private loop (a later request starts them again)."""
        with self._lock:
            loop, client, pid = self._loop, self._client, self._pid
            self._reset()
        if loop is not None and pid == os.getpid():
            if client is not None:
                loop.run(client.aclose())
            loop.close()

    def __getstate__(self) -> dict[str, Any]:
        """Picklable (e.g. shipped to a Dask worker): the loop, client and locks are rebuilt there."""
        state = dict(self.__dict__)
        state.update(_pid=-1, _loop=None, _client=None, _sem=None, _locks={}, _lock=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

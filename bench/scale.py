"""Measured scale: ``thresher run`` (validate + exact_dedup + near_dedup) on an N-row corpus, against plain polars.

    python bench/scale.py [--rows 1000000] [--workers 2] [--shard-rows 50000] [--no-near-dedup]
                          [--compare-both] [--work /tmp/thresher-scale] [--keep]

The corpus (``--rows`` JSONL lines in ``--files`` files, OpenAI ``messages`` format, no id field)
is built from ``../shared/data`` and cached under ``--work`` (rebuilt only when a parameter
changes). Its pool is every real prompt/response conversation there: AlpacaEval's 805
instructions x 8 models' answers (NullModel's garbage left out), GSM8K train + test, both
CodeAlpaca files (``output``; ``input`` appended to the instruction as thresher's alpaca reader
does), the self-instruct seed instances and ShareGPT's multi-turn dummy conversations: 22,456
conversations. 1M rows are ~780 MiB of JSONL, built in about a minute on 2 cores. Each file is made by its own seeded RNG (``--seed``, file index):

- every generated row re-samples one pool conversation (uniformly, with replacement) and edits
  every turn's text, split on single spaces: ``max(1, stochastic_round(--edit-rate x words))``
  edits per turn, each one of, with equal chance, *replace* a word with a word drawn from the
  pool's vocabulary, *drop* a word (replace when the turn has one word), or *swap* a word with
  the next; so rows are not exact copies, but re-samples of one conversation are
  near-duplicates (near_dedup finds many of them: the pool is ~22k conversations);
- ``--dup-share`` (10%) of each file's lines are verbatim second copies of another of its
  generated lines (lines then shuffled): exact_dedup's work;
- invalid rows, drawn per generated row: ``--empty-share`` (0.1%) get an empty last response
  (thresher quarantines them while reading: ``empty_field``), ``--bad-share`` (0.05%) lose
  their last response (validate: ``no_response``) and as many again start with the assistant
  (validate: ``bad_turn_order``).

Measured in the same run (``--workers`` Dask worker processes; every process's RSS sampled
every 0.2 s with psutil, peaks per process):

1. ``thresher run`` on a config of validate + exact_dedup + near_dedup (``--no-near-dedup``:
   without it; ``--compare-both``: both), a fresh OUT and work store each run (``--keep``
   reuses them, so finished (stage, shard) results are reused): wall time, the driver's peak
   RSS, each Dask worker's (and the Prefect server's), the manifest's counts and per-stage
   seconds (summed over tasks), each phase's wall time from thresher's progress lines (ingest,
   each stage, a global stage's per-shard step) and what is left: the rest of the flow
   (sharding, output) and the start-up/shut-down outside it;
2. the baseline: a plain polars script in a subprocess with ``--workers`` threads
   (``POLARS_MAX_THREADS``), the same cores: read the JSONL files, keep rows whose turns all
   have non-empty text and whose roles alternate user/assistant (a system turn first allowed)
   ending with the assistant's, drop exact duplicates of the normalized conversation (NFC,
   whitespace runs folded, stripped: thresher's ``content_id``; a 64-bit hash of it), keep
   the first, write Parquet. polars does no near-duplicate detection: near_dedup's time is
   work the baseline does not do.

Goals (issue 18): thresher's wall time <= 3x polars', driver peak RSS <= 1.5 GB at 1M rows.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import psutil
import yaml

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CORPUS_VERSION = 2  # bump when the way rows are made changes: the cached corpus is rebuilt
SAMPLE_S = 0.2
GOAL_TIME_RATIO = 3.0
GOAL_DRIVER_MB = 1500.0


# --------------------------------------------------------------------------- the corpus

def pool() -> list[list[tuple[str, str]]]:
    """Every real prompt/response conversation in ../shared/data, as [(role, text)...], roles alternating."""
    convs: list[list[tuple[str, str]]] = []

    def pair(prompt, response) -> None:
        if isinstance(prompt, str) and isinstance(response, str) and prompt.strip() and response.strip():
            convs.append([("user", prompt), ("assistant", response)])

    def prompt_of(r: dict) -> str:
        extra = r.get("input") or ""
        return f"{r['instruction']}\n\n{extra}" if extra.strip() else r["instruction"]

    for f in sorted((DATA / "alpaca_eval").glob("*.json")):
        if f.stem != "NullModel":
            for r in json.loads(f.read_text()):
                pair(r["instruction"], r["output"])
    for split in ("train", "test"):
        for line in (DATA / "gsm8k" / f"{split}.jsonl").read_text().splitlines():
            r = json.loads(line)
            pair(r["question"], r["answer"])
    for name in ("code_alpaca_2k.json", "new_codealpaca.json"):
        for r in json.loads((DATA / "codealpaca" / name).read_text()):
            pair(prompt_of(r), r["output"])
    for line in (DATA / "self_instruct" / "seed_tasks.jsonl").read_text().splitlines():
        r = json.loads(line)
        for inst in r["instances"]:
            pair(prompt_of({"instruction": r["instruction"], "input": inst.get("input")}), inst.get("output"))
    roles = {"human": "user", "gpt": "assistant"}
    for r in json.loads((DATA / "sharegpt" / "dummy_conversation.json").read_text()):
        turns = [(roles.get(t["from"]), t["value"]) for t in r["conversations"]]
        alternating = all(role == ("user", "assistant")[i % 2] for i, (role, _) in enumerate(turns))
        if turns and alternating and len(turns) % 2 == 0 and all(t.strip() for _, t in turns):
            convs.append(turns)
    return convs


def _edit(words: list[str], rng: random.Random, rate: float, vocab: list[str]) -> str:
    """``words`` (a turn split on single spaces, not changed) with max(1, stochastic_round(rate x len)) edits."""
    original, words, r = words, words.copy(), rng.random
    for _ in range(max(1, int(rate * len(words) + r()))):
        n = len(words)
        j, op = int(r() * n), int(r() * 3)
        if op == 0 or (op == 1 and n == 1):
            words[j] = vocab[int(r() * len(vocab))]
        elif op == 1:
            del words[j]
        elif j + 1 < n:
            words[j], words[j + 1] = words[j + 1], words[j]
    edited = " ".join(words)
    return edited if edited.strip() else " ".join(original)


_SPLIT: tuple[list, list] | None = None


def split_pool() -> tuple[list[list[tuple[str, list[str]]]], list[str]]:
    """The pool with every turn split on single spaces, and its vocabulary (once per process)."""
    global _SPLIT
    if _SPLIT is None:
        convs = [[(role, text.split(" ")) for role, text in c] for c in pool()]
        vocab = sorted({w for c in convs for _, words in c for w in words if w.strip() == w and 0 < len(w) < 20})
        _SPLIT = convs, vocab
    return _SPLIT


def build_file(job: tuple[int, int, dict, str]) -> dict:
    """Write one JSONL file of ``n`` lines; the counts of what it holds."""
    index, n, spec, path = job
    convs, vocab = split_pool()
    rng = random.Random(spec["seed"] * 1_000_003 + index)
    n_copies = round(spec["dup_share"] * n)
    counts = {"lines": n, "verbatim_copies": n_copies, "empty_response": 0, "no_response": 0, "bad_turn_order": 0}
    kinds: list[str | None] = []
    lines: list[str] = []
    rate, empty, bad = spec["edit_rate"], spec["empty_share"], spec["bad_share"]
    for _ in range(n - n_copies):
        turns = [(role, _edit(words, rng, rate, vocab)) for role, words in convs[int(rng.random() * len(convs))]]
        u = rng.random()
        kind = None
        if u < empty:
            kind, turns[-1] = "empty_response", (turns[-1][0], "")
        elif u < empty + bad:
            kind, turns = "no_response", turns[:-1]
        elif u < empty + 2 * bad:
            kind, turns = "bad_turn_order", [("assistant", turns[-1][1])] + turns[:-1]
        kinds.append(kind)
        lines.append(json.dumps({"messages": [{"role": r, "content": t} for r, t in turns]}, ensure_ascii=False))
    for j in rng.sample(range(len(lines)), n_copies):
        lines.append(lines[j])
        kinds.append(kinds[j])
    for kind in kinds:
        if kind:
            counts[kind] += 1
    rng.shuffle(lines)
    tmp = Path(path + ".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.rename(path)
    return counts


def corpus(args) -> tuple[list[str], dict]:
    """The corpus's files (built, or found built with the same parameters) and what they hold."""
    spec = {"version": CORPUS_VERSION, "rows": args.rows, "files": args.files, "seed": args.seed,
            "edit_rate": args.edit_rate, "dup_share": args.dup_share, "empty_share": args.empty_share,
            "bad_share": args.bad_share}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    folder = Path(args.work) / f"corpus-{args.rows}-{key}"
    done = folder / "corpus.json"
    paths = [str(folder / f"part-{i:02d}.jsonl") for i in range(args.files)]
    if done.exists() and all(Path(p).exists() for p in paths):
        info = json.loads(done.read_text())
        if info["spec"] == spec:
            return paths, {**info, "cached": True}
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    started = time.perf_counter()
    sizes = [(i + 1) * args.rows // args.files - i * args.rows // args.files for i in range(args.files)]
    with ProcessPoolExecutor(min(args.files, os.cpu_count() or 1)) as ex:
        parts = list(ex.map(build_file, [(i, n, spec, p) for i, (n, p) in enumerate(zip(sizes, paths))]))
    totals = {k: sum(p[k] for p in parts) for k in parts[0]}
    info = {"spec": spec, "counts": totals, "pool": len(pool()), "build_seconds": round(time.perf_counter() - started, 1),
            "bytes": sum(Path(p).stat().st_size for p in paths)}
    done.write_text(json.dumps(info, indent=1))
    return paths, {**info, "cached": False}


# --------------------------------------------------------------------------- measuring processes

def role_of(cmdline: list[str], is_root: bool) -> str:
    if is_root:
        return "driver"
    cmd = " ".join(cmdline)
    if "resource_tracker" in cmd:
        return "mp resource tracker"
    if "prefect" in cmd or "uvicorn" in cmd:
        return "prefect server"
    if any(s in cmd for s in ("distributed", "spawn", "multiprocessing", "forkserver", "dask")):
        return "dask worker"
    return "other: " + cmd[:60]


class Sampler:
    """Peak RSS and last CPU seconds of a process and its descendants, sampled every SAMPLE_S."""

    def __init__(self, pid: int):
        self.root = psutil.Process(pid)
        self.peak: dict[int, int] = {}
        self.cpu: dict[int, float] = {}
        self.role: dict[int, str] = {}
        self.tree_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        try:
            procs = [self.root] + self.root.children(recursive=True)
        except psutil.Error:
            return
        total = 0
        for p in procs:
            try:
                with p.oneshot():
                    rss = p.memory_info().rss
                    t = p.cpu_times()
                    if p.pid not in self.role:
                        self.role[p.pid] = role_of(p.cmdline(), p.pid == self.root.pid)
            except psutil.Error:
                continue
            total += rss
            self.peak[p.pid] = max(self.peak.get(p.pid, 0), rss)
            self.cpu[p.pid] = t.user + t.system
        self.tree_peak = max(self.tree_peak, total)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(SAMPLE_S)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def by_role(self, role: str) -> list[tuple[int, float, float]]:
        """(pid, peak MB, CPU s) of the processes in ``role``."""
        return [(pid, self.peak[pid] / 2**20, self.cpu.get(pid, 0.0)) for pid in sorted(self.peak)
                if self.role.get(pid) == role]

    def others(self) -> list[tuple[str, int, float, float]]:
        return [(self.role[pid], pid, self.peak[pid] / 2**20, self.cpu.get(pid, 0.0)) for pid in sorted(self.peak)
                if self.role.get(pid) not in ("driver", "dask worker")]


def measured(cmd: list[str], log: Path, env: dict | None = None) -> tuple[float, int, Sampler]:
    """Run ``cmd`` with its output in ``log``: (wall seconds, exit code, its sampler)."""
    with open(log, "w") as out:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        sampler = Sampler(proc.pid)
        rc = proc.wait()
        seconds = time.perf_counter() - started
    sampler.stop()
    return seconds, rc, sampler


# --------------------------------------------------------------------------- thresher

def run_thresher(args, paths: list[str], near: bool, split: bool = True) -> dict:
    tag = ("near" if near else "exact") + ("" if split else "-unsplit")
    out = Path(args.work) / f"out-{args.rows}-{tag}"
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    stages = [{"stage": "validate"}, {"stage": "exact_dedup"}]
    if near:  # examples/dedup.yaml's parameters (the stage's defaults)
        stages.append({"stage": "near_dedup", "ngram": 5, "num_perm": 112, "bands": 14, "rows_per_band": 8,
                       "text": "conversation"})
    config = {"name": f"scale-{tag}", "inputs": paths, "out": str(out), "cache_dir": str(out / ".thresher"),
              "shard_rows": args.shard_rows, "execution": {"workers": args.workers}, "stages": stages}
    if not split:  # every file read by one task, as before split ingest
        config["ingest"] = {"split_min_bytes": 1 << 50}
    cfg_path = Path(args.work) / f"scale-{args.rows}-{tag}.yaml"
    cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
    exe = Path(sys.executable).parent / "thresher"
    cmd = [str(exe), "run", str(cfg_path), "--out", str(out)]
    log = Path(args.work) / f"thresher-{args.rows}-{tag}.log"
    print(f"\n# thresher, {'validate + exact_dedup + near_dedup' if near else 'validate + exact_dedup'}: "
          f"{shlex.join(cmd)}  (log: {log})", flush=True)
    seconds, rc, s = measured(cmd, log)
    if rc != 0:
        print(log.read_text()[-3000:])
        raise SystemExit(f"thresher exited {rc}; see {log}")
    manifest = json.loads((out / "manifest.json").read_text())
    driver = s.by_role("driver")[0]
    workers = s.by_role("dask worker")
    c = manifest["counts"]
    print(f"wall {seconds:.1f} s (manifest total {manifest['timings']['total_seconds']:.1f} s); "
          f"{c['input']:,} rows in -> {c['output']:,} out + {c['rejected']:,} rejected")
    print(f"  rejected by reason: {json.dumps(c['rejected_by_reason'])}")
    print(f"  rejected by stage:  {json.dumps(c['rejected_by_stage'])}")
    # wall time of each phase, from the progress lines ("thresher: near_dedup (per shard): 2/2 tasks, done in 4.0 s")
    walls = {m[1]: float(m[2]) for m in re.finditer(r"^thresher: (.+?): \d+/\d+ tasks.*done in ([\d.]+) s$",
                                                     log.read_text(), re.M)}
    total = manifest.get("timings", {}).get("total_seconds", seconds)
    print(f"  {'phase':<24}{'in':>11}{'rejected':>11}{'out':>11}{'tasks':>7}{'task s':>9}{'wall s':>9}"
          "   (task s: manifest's stage seconds, summed over its tasks; wall s: its progress line)")
    rows_read = sum(i["records"] + i["rejected"] for i in manifest["inputs"])
    ingest_rejected = sum(i["rejected"] for i in manifest["inputs"])
    counted = {"ingest": f"{rows_read:>11,}{ingest_rejected:>11,}{rows_read - ingest_rejected:>11,}"
                         f"{len(manifest['inputs']):>7}{'':>9}"}
    for st in manifest["stages"]:
        task_s = f"{st['seconds']:>9.1f}" if "seconds" in st else f"{'':>9}"
        counted[st["stage"]] = (f"{st['in']:>11,}{st['rejected']:>11,}{st['out']:>11,}"
                                f"{st.get('computed', 0) + st.get('cached', 0):>7}{task_s}")
    for label in [*walls, *(k for k in counted if k not in walls)]:  # progress order, then any without a line
        wall = f"{walls[label]:>9.1f}" if label in walls else f"{'':>9}"
        print(f"  {label:<24}{counted.get(label, f'{chr(32) * 49}')}{wall}")
    phased = sum(walls.values())
    print(f"  {'rest of the flow':<73}{total - phased:>9.1f}   (what has no progress line: sharding, collecting "
          "and writing the output, manifest, report)")
    print(f"  {'outside the flow':<73}{seconds - total:>9.1f}   (start-up: imports, Prefect server, Dask cluster; "
          "shut-down)")
    print(f"  {manifest['shards']['count']} shards of <= {manifest['shards']['shard_rows']:,} rows")
    print(f"  peak RSS: driver {driver[1]:,.0f} MB ({driver[2]:.0f} CPU s)"
          f"{'  OVER the 1.5 GB goal' if driver[1] > GOAL_DRIVER_MB else ''}; "
          + "; ".join(f"worker pid {pid} {mb:,.0f} MB ({cpu:.0f} CPU s)" for pid, mb, cpu in workers)
          + f"; workers' sum {sum(mb for _, mb, _ in workers):,.0f} MB")
    for role, pid, mb, cpu in s.others():
        print(f"  peak RSS: {role} pid {pid} {mb:,.0f} MB ({cpu:.0f} CPU s)")
    print(f"  peak RSS of the whole process tree at one time: {s.tree_peak / 2**20:,.0f} MB")
    return {"label": f"thresher {'+ near_dedup' if near else '(no near_dedup)'}" + ('' if split else ', files whole'), "seconds": seconds,
            "driver_mb": driver[1], "workers_mb": sum(mb for _, mb, _ in workers),
            "worker_max_mb": max((mb for _, mb, _ in workers), default=0.0), "tree_mb": s.tree_peak / 2**20,
            "out": c["output"], "near": near, "manifest": manifest, "cmd": shlex.join(cmd)}


# --------------------------------------------------------------------------- polars

def polars_job(spec: dict) -> None:
    """The baseline itself (in its own process): read, validate-like filter, exact dedup, write Parquet."""
    started = time.perf_counter()
    import polars as pl

    imported = time.perf_counter()
    schema = {"messages": pl.List(pl.Struct({"role": pl.String, "content": pl.String}))}
    content, role = pl.element().struct.field("content"), pl.element().struct.field("role")
    msgs = pl.col("messages")
    valid = ((msgs.list.len() >= 2)
             & msgs.list.eval(content.str.strip_chars().str.len_chars() > 0).list.all()
             & msgs.list.eval(role).list.join(",").str.contains(r"^(system,)?(user,assistant,)*user,assistant$"))
    key = msgs.list.eval(role + pl.lit("\x1f") + content.str.normalize("NFC").str.replace_all(r"\s+", " ")
                         .str.strip_chars()).list.join("\x1e").hash()
    lf = pl.scan_ndjson(spec["files"], schema=schema)
    table = lf.with_columns(valid.fill_null(False).alias("valid")).collect()
    n_in = table.height
    table = table.filter(pl.col("valid")).drop("valid")
    n_valid = table.height
    table = table.filter(key.is_first_distinct())
    Path(spec["out"]).mkdir(parents=True, exist_ok=True)
    table.write_parquet(Path(spec["out"]) / "part-00000.parquet")
    done = time.perf_counter()
    print(json.dumps({"in": n_in, "valid": n_valid, "out": table.height, "seconds": done - imported,
                      "import_seconds": imported - started, "threads": pl.thread_pool_size()}))


def run_polars(args, paths: list[str]) -> dict:
    out = Path(args.work) / f"polars-out-{args.rows}"
    shutil.rmtree(out, ignore_errors=True)
    log = Path(args.work) / f"polars-{args.rows}.log"
    cmd = [sys.executable, __file__, "--polars-job", json.dumps({"files": paths, "out": str(out)})]
    env = {**os.environ, "POLARS_MAX_THREADS": str(args.polars_threads or args.workers)}
    print(f"\n# polars baseline (POLARS_MAX_THREADS={env['POLARS_MAX_THREADS']}): read JSONL, validate-like filter, "
          f"exact dedup on a hash of the normalized conversation, write Parquet  (log: {log})", flush=True)
    seconds, rc, s = measured(cmd, log, env)
    if rc != 0:
        print(log.read_text()[-3000:])
        raise SystemExit(f"the polars baseline exited {rc}; see {log}")
    r = json.loads(log.read_text().strip().splitlines()[-1])
    mb = s.peak[s.root.pid] / 2**20
    print(f"wall {seconds:.1f} s (its own timing, after importing polars: {r['seconds']:.1f} s; "
          f"{r['threads']} threads); {r['in']:,} rows in -> {r['valid']:,} valid -> {r['out']:,} out; "
          f"peak RSS {mb:,.0f} MB")
    return {"label": "polars baseline", "seconds": seconds, "driver_mb": mb, "workers_mb": 0.0,
            "worker_max_mb": 0.0, "tree_mb": s.tree_peak / 2**20, "out": r["out"], "near": False}


# --------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000, help="JSONL lines in the corpus, copies and invalid rows included")
    ap.add_argument("--files", type=int, default=8, help="JSONL files the corpus is written in")
    ap.add_argument("--work", default="/tmp/thresher-scale", help="where the corpus, configs, outputs and logs go")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--edit-rate", type=float, default=0.05, help="word edits per word of each turn (at least 1 per turn)")
    ap.add_argument("--dup-share", type=float, default=0.10, help="share of lines that are verbatim second copies")
    ap.add_argument("--empty-share", type=float, default=0.001, help="share of rows with an empty last response")
    ap.add_argument("--bad-share", type=float, default=0.0005,
                    help="share of rows with no final response, and again of rows that start with the assistant")
    ap.add_argument("--workers", type=int, default=2, help="thresher's Dask worker processes (and polars' threads)")
    ap.add_argument("--polars-threads", type=int, default=None, help="polars' threads (default: --workers)")
    ap.add_argument("--shard-rows", type=int, default=50_000)
    ap.add_argument("--no-near-dedup", action="store_true", help="run thresher without near_dedup")
    ap.add_argument("--compare-both", action="store_true", help="run thresher with and without near_dedup")
    ap.add_argument("--compare-split", action="store_true",
                    help="also run thresher (no near_dedup) with every file read by one task: split ingest's gain "
                         "(it splits a JSONL file when the files are fewer than the workers: try --files 1)")
    ap.add_argument("--keep", action="store_true", help="reuse the previous OUT and work store (finished results)")
    ap.add_argument("--polars-job", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.polars_job:
        return polars_job(json.loads(args.polars_job))
    Path(args.work).mkdir(parents=True, exist_ok=True)
    command = shlex.join([sys.executable, *sys.argv])

    paths, info = corpus(args)
    c = info["counts"]
    print(f"# corpus: {c['lines']:,} JSONL lines ({info['bytes'] / 2**20:,.0f} MiB) in {len(paths)} files under "
          f"{Path(paths[0]).parent} ({'cached' if info['cached'] else 'built'}, {info['build_seconds']} s to build)")
    print(f"#   re-sampled with replacement from {info['pool']:,} real conversations in {DATA} (AlpacaEval x 8 models, "
          f"GSM8K, CodeAlpaca, self-instruct, ShareGPT), OpenAI messages format;")
    print(f"#   every turn edited: max(1, {args.edit_rate:g} x its words) word edits, each replace (a pool word), "
          f"drop or swap with the next, seed {args.seed};")
    print(f"#   {c['verbatim_copies']:,} lines are verbatim second copies of another line ({args.dup_share:.0%}); "
          f"invalid: {c['empty_response']:,} empty last response (ingest: empty_field), {c['no_response']:,} "
          f"no final response (validate: no_response), {c['bad_turn_order']:,} start with the assistant "
          f"(validate: bad_turn_order); copies of invalid rows included")
    print(f"# {os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB; thresher: {args.workers} "
          f"workers, shard_rows {args.shard_rows:,}", flush=True)

    variants = [True, False] if args.compare_both else [not args.no_near_dedup]
    results = [run_polars(args, paths)]
    for near in variants:
        results.append(run_thresher(args, paths, near))
    if args.compare_split:
        results.append(run_thresher(args, paths, False, split=False))

    base = results[0]
    print(f"\n# results, {c['lines']:,} rows, {os.cpu_count()} CPUs ({args.workers} Dask workers / polars threads)")
    print(f"{'':<28}{'wall s':>9}{'x polars':>10}{'driver MB':>11}{'workers MB':>12}{'max worker':>12}"
          f"{'tree MB':>9}{'rows out':>11}")
    for r in results:
        print(f"{r['label']:<28}{r['seconds']:>9.1f}{r['seconds'] / base['seconds']:>10.2f}{r['driver_mb']:>11,.0f}"
              f"{r['workers_mb']:>12,.0f}{r['worker_max_mb']:>12,.0f}{r['tree_mb']:>9,.0f}{r['out']:>11,}")
    for r in results[1:]:
        ratio = r["seconds"] / base["seconds"]
        note = " (near_dedup is extra work polars does not do)" if r["near"] else ""
        print(f"goal check, {r['label']}: time {ratio:.2f}x polars (goal <= {GOAL_TIME_RATIO:g}x: "
              f"{'met' if ratio <= GOAL_TIME_RATIO else 'NOT met'}){note}; driver {r['driver_mb']:,.0f} MB "
              f"(goal <= {GOAL_DRIVER_MB:,.0f} MB: {'met' if r['driver_mb'] <= GOAL_DRIVER_MB else 'NOT met'})")
    print("\n# command: " + command)
    for r in results[1:]:
        print(f"# {r['label']}: {r['cmd']}")


if __name__ == "__main__":
    sys.exit(main())

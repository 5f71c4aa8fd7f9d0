"""The LLM2LLM loop as a Prefect flow: train, evaluate, augment, per iteration; orchestration only.

LLM2LLM (Lee et al. 2024, "LLM2LLM: Boosting LLMs with Novel Iterative Data Enhancement",
arXiv:2403.15042; reference code SqueezeAILab/LLM2LLM) grows a small seed set where a student is
weak. Each iteration ``i`` of ``iterations``:

1. **train** the student *from its base model* on the seeds plus every augmentation accepted so
   far (:mod:`thresher.llm2llm.trainer`);
2. **evaluate** it on the seeds, and on the held-out set when there is one
   (:mod:`thresher.llm2llm.evaluate`), grading each answer (:mod:`thresher.llm2llm.graders`);
3. **augment**: the teacher writes ``m`` new examples for each seed it got wrong
   (:mod:`thresher.llm2llm.augment`); the accepted ones join the training set.

Every step is content-addressed, so a loop stopped anywhere (Ctrl-C, SIGTERM, SIGKILL) resumes at
the step it was in and the same config gives the same outputs:

- **train** is keyed by the training rows' digest, the trainer config and the base model's
  identity; the checkpoint is ``OUT/iterations/NN/student`` with the key in
  ``thresher_step.json`` (a trainer writes a staging folder and renames it when done, so a
  folder there is always finished);
- **evaluate** by the train key (the checkpoint's identity), the evaluation settings, the grader
  and the examples' digest, stored in the work store (``OUT/.thresher/llm2llm-eval/<key>``): a
  finished evaluation needs neither the checkpoint nor a retraining, so ``keep_checkpoints: false``
  can delete it;
- **augment** by the training rows (which hold the augmentations so far), the wrong seeds and
  their answers, the teacher's identity and settings, the iteration, the held-out digest and
  the thresholds (``OUT/.thresher/llm2llm-augment/<key>``); its teacher requests also go through
  the request cache.

The manifest's ``steps`` says, for every step, whether it ``ran`` or was ``reused``.

Outputs: ``OUT/iterations/NN/`` (``train.parquet``, ``eval.parquet``, ``augmentations.parquet``,
``rejected.parquet``, ``metrics.json``, ``student/``), ``OUT/data/part-00000.parquet`` (the final
training set: the seeds and every accepted augmentation), ``OUT/rejected/part-00000.parquet``
(rows that could not be read, teacher output that was unusable or a copy), ``OUT/manifest.json``
and ``OUT/report.md``.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from thresher.flows.manifest import package_versions
from thresher.flows.store import Store, digest
from thresher.llm2llm.augment import REJECTED_AUGMENT_SCHEMA, AugmentResult, KeptQuestions, augment, rejected_table
from thresher.llm2llm.check import lineage_problems
from thresher.llm2llm.config import LLM2LLMConfig, load_llm2llm_config
from thresher.llm2llm.evaluate import accuracy, evaluate
from thresher.llm2llm.examples import (
    TRAINING_SCHEMA, ExampleSet, question, read_examples, rows_digest, training_table,
)
from thresher.llm2llm.graders import Grader, make_grader
from thresher.llm2llm.novelty import HeldOutIndex
from thresher.llm2llm.report import write_report
from thresher.llm2llm.trainer import trainer_config

STEP_FILE = "thresher_step.json"  # in a checkpoint: the train key it was made for
VERSION = 1  # bump when a step's semantics change: every key changes with it


def _log(show: bool, message: str) -> None:
    if show:
        print(f"llm2llm: {message}", file=sys.stderr, flush=True)


def _write_parquet(table: pa.Table, path: Path) -> None:
    """Written to a temporary name and renamed: a file there is always whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def _write_json(value: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def _rows(table: pa.Table | None) -> list[dict[str, Any]]:
    return table.to_pylist() if table is not None else []


# --------------------------------------------------------------------------- the three steps


def student_identity(config: LLM2LLMConfig) -> str:
    from thresher.generators.model_files import resolve_model_path

    return resolve_model_path(config.student.name, config.student.revision)[2]


def train_key(config: LLM2LLMConfig, training_digest: str) -> str:
    return digest({"v": VERSION, "step": "train", "data": training_digest, "base_model": student_identity(config),
                   "trainer": trainer_config(config.trainer).model_dump(mode="json")})


@task(name="llm2llm-train", cache_policy=NO_CACHE)
def train_step(config: LLM2LLMConfig, key: str, train_parquet: str, checkpoint: str) -> dict[str, Any]:
    """The student trained on ``train_parquet``, at ``checkpoint`` (reused when made for ``key``)."""
    from thresher.llm2llm.trainer import train

    folder = Path(checkpoint)
    marker = folder / STEP_FILE
    if marker.is_file() and json.loads(marker.read_text()).get("key") == key:
        return {"status": "reused", "seconds": 0.0}
    shutil.rmtree(folder, ignore_errors=True)  # made for other data or settings
    for stale in folder.parent.glob(f".{folder.name}.tmp-*"):  # a trainer killed before it finished
        shutil.rmtree(stale, ignore_errors=True)
    started = time.monotonic()
    train(train_parquet, config.student.name, folder, config.trainer)
    _write_json({"key": key}, marker)
    record = json.loads((folder / "thresher_train.json").read_text())
    losses = [h["loss"] for h in record.get("losses", [])]
    return {"status": "ran", "seconds": round(time.monotonic() - started, 1), "steps": record.get("steps"),
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None}


@task(name="llm2llm-evaluate", cache_policy=NO_CACHE)
def evaluate_step(config: LLM2LLMConfig, checkpoint: str, sets: list[tuple[str, list[dict]]],
                  grader: Grader) -> pa.Table:
    """The checkpoint's graded answers on each ``(split, records)`` set."""
    from thresher.generators.registry import borrowed_model

    model = config.student.model_copy(update={"name": checkpoint, "revision": None})
    with borrowed_model(model, reason="llm2llm_evaluated", cache=False) as student:
        return pa.concat_tables([evaluate(student, records, split, grader, config.evaluation)
                                 for split, records in sets])


@task(name="llm2llm-augment", cache_policy=NO_CACHE)
def augment_step(config: LLM2LLMConfig, wrong: list[tuple[dict, str]], iteration: int, kept: KeptQuestions,
                 held_out: HeldOutIndex | None, cache_path: str) -> AugmentResult:
    from thresher.generators.registry import borrowed_model

    # its room goes to the next training, unless this process held the teacher before the step
    with borrowed_model(config.teacher.model, reason="llm2llm_augmented", cache=True,
                        cache_path=cache_path) as teacher:
        return augment(teacher, wrong, config.teacher, iteration, kept, held_out, config.seed)


def teacher_identity(config: LLM2LLMConfig) -> str:
    """The teacher's identity without loading it: its semantic fields (and the embedded file's hash)."""
    fields = config.teacher.model.semantic_fields()
    if config.teacher.model.backend != "openai":
        from thresher.generators.model_files import resolve_model_path

        fields["identity"] = resolve_model_path(config.teacher.model.name, config.teacher.model.revision)[2]
    return digest(fields)


# --------------------------------------------------------------------------- the loop


class Loop:
    """One loop's state: the config, the examples, the stores, the steps taken."""

    def __init__(self, config: LLM2LLMConfig, show: bool):
        self.config, self.show = config, show
        self.out = Path(config.out)
        self.work = Path(config.cache_dir) if config.cache_dir else self.out / ".thresher"
        self.store = Store(self.work)
        self.grader = make_grader(config.grader)
        self.steps: list[dict[str, Any]] = []
        self.seeds = self._read(config.seeds, "seeds")
        self.held_out = self._read(config.held_out, "held_out") if config.held_out else None
        if not self.seeds.records:
            raise ValueError(f"no usable seed rows in {config.seeds.inputs} "
                             f"({len(self.seeds.rejected)} rejected on read)")
        self.held_index = (HeldOutIndex([question(r) for r in self.held_out.records], config.held_out_threshold)
                           if self.held_out and self.held_out.records else None)

    def _read(self, examples, role: str) -> ExampleSet:
        found = read_examples(examples, role, self.grader)
        _log(self.show, f"{role}: {len(found.records)} rows sampled of {found.n_valid} usable "
                        f"({found.n_read} read, {len(found.rejected)} rejected)")
        return found

    def step(self, iteration: int, name: str, key: str, status: str, seconds: float, **extra: Any) -> None:
        self.steps.append({"iteration": iteration, "step": name, "key": key, "status": status,
                           "seconds": round(seconds, 1), **extra})
        _log(self.show, f"iteration {iteration}: {name} {status}" + (f" in {seconds:.1f} s" if status == "ran" else ""))

    def evaluation(self, iteration: int, tkey: str, checkpoint: Path, train_parquet: Path) -> pa.Table:
        sets = [("seeds", self.seeds.records)]
        if self.held_out is not None:
            sets.append(("held_out", self.held_out.records))
        ekey = digest({"v": VERSION, "step": "evaluate", "train": tkey, "evaluation": self.config.evaluation.model_dump(),
                       "grader": self.grader.params(), "student": self.config.student.semantic_fields(),
                       "sets": [(split, rows_digest(records)) for split, records in sets]})
        if self.store.is_done("llm2llm-eval", ekey):
            self.step(iteration, "train", tkey, "skipped", 0.0, why="its evaluation is stored")
            self.step(iteration, "evaluate", ekey, "reused", 0.0)
            return self.store.read_table("llm2llm-eval", ekey, "eval")
        _log(self.show, f"iteration {iteration}: training the student on {pq.read_metadata(train_parquet).num_rows} rows")
        trained = train_step(self.config, tkey, str(train_parquet), str(checkpoint))
        self.step(iteration, "train", tkey, trained.pop("status"), trained.pop("seconds"), **trained)
        _log(self.show, f"iteration {iteration}: evaluating the student")
        started = time.monotonic()
        table = evaluate_step(self.config, str(checkpoint), sets, self.grader)
        self.store.write("llm2llm-eval", ekey, {"eval": table}, {"rows": table.num_rows})
        self.step(iteration, "evaluate", ekey, "ran", time.monotonic() - started)
        return table

    def augmentation(self, iteration: int, training_digest: str, wrong: list[tuple[dict, str]],
                     accepted: list[dict]) -> AugmentResult:
        held_digest = rows_digest(self.held_out.records) if self.held_out else None
        akey = digest({"v": VERSION, "step": "augment", "training": training_digest,
                       "wrong": [(s["row_id"], answer) for s, answer in wrong], "iteration": iteration,
                       "teacher": teacher_identity(self.config),
                       "teacher_settings": self.config.teacher.model_dump(mode="json", exclude={"model"}),
                       "held_out": held_digest, "near_copy": self.config.near_copy_threshold,
                       "held_out_threshold": self.config.held_out_threshold, "seed": self.config.seed})
        if self.store.is_done("llm2llm-augment", akey):
            self.step(iteration, "augment", akey, "reused", 0.0)
            info = self.store.read_info("llm2llm-augment", akey)
            return AugmentResult(accepted=_rows(self.store.read_table("llm2llm-augment", akey, "accepted")),
                                 rejected=_rows(self.store.read_table("llm2llm-augment", akey, "rejected")),
                                 requests=info["requests"], retries=info["retries"], short=info["seeds_short"])
        _log(self.show, f"iteration {iteration}: the teacher writes {self.config.teacher.m} example(s) "
                        f"for each of {len(wrong)} wrong seeds")
        started = time.monotonic()
        kept = KeptQuestions(self.seeds.records + accepted, self.config.near_copy_threshold)
        result = augment_step(self.config, wrong, iteration, kept, self.held_index,
                              str(self.work / "requests.sqlite"))
        self.store.write("llm2llm-augment", akey, {
            "accepted": pa.Table.from_pylist(result.accepted, schema=TRAINING_SCHEMA),
            "rejected": rejected_table(result.rejected)}, result.stats())
        self.step(iteration, "augment", akey, "ran", time.monotonic() - started)
        return result

    def iteration(self, iteration: int, accepted: list[dict]) -> tuple[dict[str, Any], AugmentResult]:
        folder = self.out / "iterations" / f"{iteration:02d}"
        training = training_table(self.seeds.records, accepted)
        train_parquet = folder / "train.parquet"
        _write_parquet(training, train_parquet)
        training_digest = rows_digest(self.seeds.records + accepted)  # the rows of `training`, in order
        tkey = train_key(self.config, training_digest)
        checkpoint = folder / "student"
        table = self.evaluation(iteration, tkey, checkpoint, train_parquet)
        _write_parquet(table, folder / "eval.parquet")
        if not self.config.keep_checkpoints:
            shutil.rmtree(checkpoint, ignore_errors=True)
        seeds_eval = table.filter(pc.equal(table["split"], "seeds"))
        held_eval = table.filter(pc.equal(table["split"], "held_out"))
        correct = dict(zip(seeds_eval["row_id"].to_pylist(), seeds_eval["correct"].to_pylist()))
        answers = dict(zip(seeds_eval["row_id"].to_pylist(), seeds_eval["prediction"].to_pylist()))
        wrong = [(s, answers[s["row_id"]]) for s in self.seeds.records if not correct[s["row_id"]]]
        result = self.augmentation(iteration, training_digest, wrong, accepted) if wrong else AugmentResult()
        _write_parquet(pa.Table.from_pylist(result.accepted, schema=TRAINING_SCHEMA), folder / "augmentations.parquet")
        _write_parquet(rejected_table(result.rejected), folder / "rejected.parquet")
        metrics = {
            "iteration": iteration, "train_rows": training.num_rows,
            "seed_accuracy": accuracy(seeds_eval), "held_out_accuracy": accuracy(held_eval),
            "seeds_wrong": len(wrong), "augmentations": len(result.accepted), **result.stats(),
            "checkpoint": str(checkpoint) if (checkpoint / STEP_FILE).is_file() else None,
        }
        metrics.pop("accepted")
        _write_json(metrics, folder / "metrics.json")
        return metrics, result


def run_loop(config: LLM2LLMConfig, show_progress: bool = True) -> dict[str, Any]:
    """Run the loop to the end (resuming whatever finished before); returns the manifest."""
    started_at = dt.datetime.now(dt.timezone.utc)
    t0 = time.monotonic()
    loop = Loop(config, show_progress)
    out = loop.out
    for stale in (out / "iterations").glob("*") if (out / "iterations").is_dir() else ():
        if stale.is_dir() and stale.name.isdigit() and int(stale.name) > config.iterations:
            shutil.rmtree(stale)  # from an earlier run with more iterations
    accepted: list[dict] = []
    rejected: list[dict] = [{**r, "parent_row_id": None, "iteration": None, "attempt": None}
                            for r in loop.seeds.rejected + (loop.held_out.rejected if loop.held_out else [])]
    per_iteration = []
    for iteration in range(1, config.iterations + 1):
        metrics, result = loop.iteration(iteration, accepted)
        per_iteration.append(metrics)
        accepted += result.accepted
        rejected += result.rejected
    final = training_table(loop.seeds.records, accepted)
    _write_parquet(final, out / "data" / "part-00000.parquet")
    _write_parquet(pa.Table.from_pylist(rejected, schema=REJECTED_AUGMENT_SCHEMA), out / "rejected" / "part-00000.parquet")
    problems = lineage_problems(out)
    if problems:
        raise RuntimeError(f"llm2llm: the output's lineage is wrong (a bug): {problems[0]} "
                           f"({len(problems)} problem(s))")
    manifest = build_manifest(loop, per_iteration, final, rejected, started_at, time.monotonic() - t0)
    _write_json(manifest, out / "manifest.json")
    write_report(manifest, out)
    return manifest


def _examples_counts(found: ExampleSet | None) -> dict[str, int] | None:
    if found is None:
        return None
    return {"read": found.n_read, "rejected": len(found.rejected), "usable": found.n_valid,
            "not_sampled": found.n_not_sampled, "used": len(found.records)}


def build_manifest(loop: Loop, per_iteration: list[dict], final: pa.Table, rejected: list[dict],
                   started_at: dt.datetime, seconds: float) -> dict[str, Any]:
    """Counts that reconcile: rows read = used + not sampled + rejected on read, per example set;
    teacher examples = accepted + rejected; output = seeds + accepted augmentations."""
    seeds = _examples_counts(loop.seeds)
    for counts in (seeds, _examples_counts(loop.held_out)):
        if counts and counts["read"] != counts["used"] + counts["not_sampled"] + counts["rejected"]:
            raise RuntimeError(f"llm2llm: example counts do not reconcile: {counts}")
    augmentations = sum(m["augmentations"] for m in per_iteration)
    if final.num_rows != seeds["used"] + augmentations:
        raise RuntimeError(f"llm2llm: {final.num_rows} output rows != {seeds['used']} seeds + {augmentations} "
                           "augmentations")
    reasons: dict[str, int] = {}
    for r in rejected:
        reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    return {
        "kind": "llm2llm", "name": loop.config.name, "out": str(loop.out),
        "started_at": started_at.isoformat(timespec="seconds"), "seconds": round(seconds, 1),
        "counts": {"seeds": seeds, "held_out": _examples_counts(loop.held_out), "augmentations": augmentations,
                   "output": final.num_rows, "rejected": len(rejected),
                   "rejected_by_reason": dict(sorted(reasons.items()))},
        "accuracy": [{"iteration": m["iteration"], "seeds": m["seed_accuracy"], "held_out": m["held_out_accuracy"]}
                     for m in per_iteration],
        "iterations": per_iteration,
        "steps": loop.steps,
        "config": loop.config.to_dict(),
        "versions": package_versions(),
    }


# --------------------------------------------------------------------------- entry points


def apply_llm2llm_overrides(config: LLM2LLMConfig, out: str | None = None,
                            cache_dir: str | None = None) -> LLM2LLMConfig:
    config = config.model_copy(deep=True)
    if out:
        config.out = str(Path(out).expanduser().resolve())
    if cache_dir:
        config.cache_dir = str(Path(cache_dir).expanduser().resolve())
    if not config.out:
        raise ValueError("no output folder: give it in the config ('out:') or with --out")
    return config


@flow(name="thresher-llm2llm-loop", validate_parameters=False)
def llm2llm_loop(config: dict[str, Any], show_progress: bool = True) -> dict[str, Any]:
    return run_loop(LLM2LLMConfig.model_validate(config), show_progress)


def execute_llm2llm(config: LLM2LLMConfig, show_progress: bool = True) -> dict[str, Any]:
    """Run a validated loop config as a Prefect flow run; returns the manifest."""
    run: Callable = llm2llm_loop.with_options(flow_run_name=config.name)
    return run(config.to_dict(), show_progress=show_progress)


@flow(name="thresher-llm2llm", validate_parameters=True)
def llm2llm(config_path: str, out: str | None = None) -> dict[str, Any]:
    """Deployable entry point: the loop in ``config_path``, optionally into another ``out``."""
    config = apply_llm2llm_overrides(load_llm2llm_config(config_path), out)
    manifest = run_loop(config, show_progress=False)
    return {"out": config.out, "counts": manifest["counts"], "accuracy": manifest["accuracy"]}

"""The ``thresher`` command line.

    thresher ingest INPUT... --out DIR     normalize + quarantine + write, no selection
    thresher run CONFIG [--input PATH]... [--out DIR] [--dask-address ADDR] [--workers N]
    thresher llm2llm CONFIG [--out DIR]     the LLM2LLM teacher-student augmentation loop
    thresher kd-check OUT --student MODEL  does MODEL's tokenizer give the KD teacher's token ids?
    thresher report OUT                    render OUT/report.md and its figures again from a finished output

Failures exit non-zero with a one-line reason on stderr (``--debug`` shows the traceback).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import List, Optional

import typer

from thresher.schemas.secrets import install_log_redaction, redact

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="thresher: curate instruction corpora into Parquet datasets for SFT and KD.",
)


def _quiet_libraries() -> None:
    """Keep Prefect's and Dask's INFO chatter off the terminal unless the user asked for it."""
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_LOGGING_LOGGERS_PREFECT_LEVEL", "WARNING")
    os.environ.setdefault("DASK_DISTRIBUTED__LOGGING__DISTRIBUTED", "error")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    # Prefect's temporary local server gets 20 s to start; on a machine busy scoring with a
    # model (the usual case here) that is too short, and the whole run failed for it
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


_STOP_SIGNALS: list[int] = []  # signals received, for the exit code and message


def _exit_cleanly_on_sigterm() -> None:
    """SIGTERM (a scheduler, Kubernetes, Slurm, `kill`) exits like Ctrl-C: cleanup runs.

    Python's default SIGTERM ends the process at once, skipping ``finally`` blocks and
    ``atexit``: the local Dask cluster and the temporary Prefect server would be left
    running as orphans. Finished (stage, shard) results are on disk either way.
    """
    def _stop(signum, frame):
        _STOP_SIGNALS.append(signum)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _stop)


def _prepare_process() -> None:
    _quiet_libraries()
    _exit_cleanly_on_sigterm()
    install_log_redaction()  # credentials never reach a log line of this process


def _terminated(err: BaseException | None, termination: type) -> bool:
    """Whether ``err`` is, or was raised while handling, Prefect's SIGTERM exception.

    During a flow run Prefect's own SIGTERM handler raises ``TerminationSignal``;
    libraries on the way out may wrap it (pydantic keeps only its name in the message).
    """
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, termination) or termination.__name__ in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


def _fail(err: BaseException, debug: bool) -> None:
    """Exit with one line: 128 + signal when stopped by one (however the libraries
    re-raised it on the way out), else 1 with the error's first line."""
    from prefect.exceptions import TerminationSignal

    if _STOP_SIGNALS or _terminated(err, TerminationSignal):
        signum = _STOP_SIGNALS[0] if _STOP_SIGNALS else signal.SIGTERM
        typer.echo(f"thresher: stopped by {signal.Signals(signum).name}; finished (stage, shard) results "
                   "are kept: run the same command again to resume", err=True)
        raise typer.Exit(code=128 + signum)
    if debug or not isinstance(err, Exception):
        raise err
    message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    typer.echo(f"thresher: error: {redact(message)}", err=True)
    raise typer.Exit(code=1)


def _progress_mode(quiet: bool) -> bool | str:
    """Progress bars on a terminal, a line per stage every few seconds otherwise (logs, CI, Prefect
    workers, nohup), nothing with --quiet."""
    if quiet:
        return False
    return "bars" if sys.stderr.isatty() else "lines"


def _finish(manifest: dict, out: str) -> None:
    c = manifest["counts"]
    reasons = ", ".join(f"{r}={n}" for r, n in c["rejected_by_reason"].items()) or "none"
    created = f" + {c['created']} created" if c.get("created") else ""
    replaced = f" + {c['replaced']} replaced" if c.get("replaced") else ""
    typer.echo(
        f"{c['input']} rows in{created} -> {c['output']} out + {c['rejected']} rejected ({reasons}){replaced}\n"
        f"wrote {out}/data, {out}/rejected, {out}/manifest.json, {out}/report.md"
    )


@app.command()
def run(
    config: Path = typer.Argument(..., help="pipeline YAML (see examples/)"),
    input: Optional[List[str]] = typer.Option(
        None, "--input", "-i", help="input file, glob or folder; replaces the config's inputs (repeatable)"),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="output folder (overrides the config's)"),
    dask_address: Optional[str] = typer.Option(
        None, "--dask-address", help="run on an existing Dask scheduler, e.g. tcp://host:8786"),
    workers: Optional[int] = typer.Option(None, "--workers", "-w", min=1, help="local Dask worker processes"),
    cache_dir: Optional[str] = typer.Option(None, "--cache-dir", help="work store (default OUT/.thresher)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars or lines"),
    debug: bool = typer.Option(False, "--debug", help="show the full traceback on failure"),
) -> None:
    """Run the pipeline in CONFIG: ingest, shard, run its stages on Dask, write Parquet + manifest + report.

    Finished (stage, shard) results are reused, so re-running after a crash or a
    kill resumes where it stopped, and changing a selection threshold re-runs no model.
    """
    _prepare_process()
    try:
        from thresher.flows.curate import apply_overrides, execute
        from thresher.flows.registry import load_config

        cfg = apply_overrides(load_config(config), input, out, dask_address, workers)
        if cache_dir:
            cfg.cache_dir = str(Path(cache_dir).resolve())
        manifest = execute(cfg, show_progress=_progress_mode(quiet))
    except BaseException as err:  # one line for the user; --debug for the rest
        _fail(err, debug)
    _finish(manifest, cfg.out)


@app.command()
def llm2llm(
    config: Path = typer.Argument(..., help="LLM2LLM loop YAML (see examples/llm2llm_gsm8k.yaml)"),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="output folder (overrides the config's)"),
    cache_dir: Optional[str] = typer.Option(None, "--cache-dir", help="work store (default OUT/.thresher)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress lines"),
    debug: bool = typer.Option(False, "--debug", help="show the full traceback on failure"),
) -> None:
    """Run the LLM2LLM loop in CONFIG: train the student, evaluate it, have the teacher write examples
    like the seeds it got wrong; repeat. Finished steps are reused: run it again to resume."""
    _prepare_process()
    try:
        from thresher.flows.llm2llm import apply_llm2llm_overrides, execute_llm2llm
        from thresher.llm2llm.config import load_llm2llm_config

        cfg = apply_llm2llm_overrides(load_llm2llm_config(config), out, cache_dir)
        manifest = execute_llm2llm(cfg, show_progress=not quiet)
    except BaseException as err:  # one line for the user; --debug for the rest
        _fail(err, debug)
    c = manifest["counts"]
    accuracy = ", ".join(f"{a['iteration']}: seeds {a['seeds']}" + (f", held-out {a['held_out']}"
                         if a["held_out"] is not None else "") for a in manifest["accuracy"])
    typer.echo(f"{c['seeds']['used']} seeds + {c['augmentations']} augmentations -> {c['output']} rows, "
               f"{c['rejected']} rejected; accuracy per iteration: {accuracy}\n"
               f"wrote {cfg.out}/data, {cfg.out}/iterations, {cfg.out}/rejected, {cfg.out}/manifest.json, "
               f"{cfg.out}/report.md")


@app.command()
def ingest(
    inputs: List[str] = typer.Argument(..., help="input files, globs or folders"),
    out: str = typer.Option(..., "--out", "-o", help="output folder"),
    format: str = typer.Option("auto", "--format", "-f", help="auto, alpaca, sharegpt, openai, gsm8k, self_instruct, candidates"),
    max_row_bytes: int = typer.Option(1_000_000, "--max-row-bytes", help="quarantine rows larger than this"),
    skip_unreadable: bool = typer.Option(False, "--skip-unreadable", help="record unreadable files as rejected instead of failing"),
    workers: int = typer.Option(2, "--workers", "-w", min=1, help="local Dask worker processes"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars or lines"),
    debug: bool = typer.Option(False, "--debug", help="show the full traceback on failure"),
) -> None:
    """Normalize INPUTS to canonical rows and quarantine bad ones; no selection."""
    _prepare_process()
    try:
        from thresher.flows.curate import apply_overrides, execute
        from thresher.flows.registry import parse_config

        cfg = parse_config({
            "name": "ingest",
            "ingest": {"format": format, "max_row_bytes": max_row_bytes,
                       "on_unreadable_file": "skip" if skip_unreadable else "error"},
            "execution": {"workers": workers},
        })
        cfg = apply_overrides(cfg, inputs, out)
        manifest = execute(cfg, show_progress=_progress_mode(quiet))
    except BaseException as err:
        _fail(err, debug)
    _finish(manifest, cfg.out)


@app.command()
def serve(
    config: Path = typer.Argument(..., help="pipeline YAML the deployment runs"),
    name: str = typer.Option("default", "--name", "-n", help="deployment name: thresher-curate/<name>"),
    cron: Optional[str] = typer.Option(None, "--cron", help='schedule, e.g. "0 3 * * *" (none: ad-hoc runs only)'),
    input: Optional[List[str]] = typer.Option(None, "--input", "-i", help="default inputs (replace the config's)"),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="default output folder"),
    dask_address: Optional[str] = typer.Option(None, "--dask-address", help="default Dask scheduler"),
    workers: Optional[int] = typer.Option(None, "--workers", "-w", min=1, help="default local worker processes"),
    llm2llm: bool = typer.Option(False, "--llm2llm", help="CONFIG is an LLM2LLM loop: serve thresher-llm2llm/NAME"),
    debug: bool = typer.Option(False, "--debug", help="show the full traceback on failure"),
) -> None:
    """Register CONFIG as the Prefect deployment thresher-curate/NAME (thresher-llm2llm/NAME with
    --llm2llm) and serve its runs.

    Uses the Prefect API at PREFECT_API_URL. Trigger an ad-hoc run with
    `prefect deployment run 'thresher-curate/NAME' --param out=/some/dir`.
    """
    _prepare_process()
    try:
        if llm2llm:
            from thresher.flows.deploy import serve_llm2llm
            from thresher.llm2llm.config import load_llm2llm_config

            load_llm2llm_config(config)  # fail now, not at the first scheduled run
            serve_llm2llm(str(config), name, cron, out)
            return
        from thresher.flows.deploy import serve as serve_deployment
        from thresher.flows.registry import load_config

        load_config(config)  # fail now, not at the first scheduled run
        serve_deployment(str(config), name, cron, input, out, dask_address, workers)
    except BaseException as err:
        _fail(err, debug)


@app.command("prepare-models")
def prepare_models(
    debug: bool = typer.Option(False, "--debug", help="show the full traceback on failure"),
) -> None:
    """Resolve every embedded model now, converting GGUF files once (about 2 minutes the first time).

    Later loads take seconds; without this, the first pipeline that needs a model converts it.
    """
    try:
        from thresher.generators.embedded import EMBEDDED, PREFIX, resolve_embedded

        for short in sorted(EMBEDDED):
            resolved = resolve_embedded(PREFIX + short)
            typer.echo(f"{resolved.identity}  {resolved.path}")
    except BaseException as err:
        _fail(err, debug)


@app.command("magpie-template")
def magpie_template(
    model: str = typer.Argument(..., help="a model folder, a folder holding only tokenizer files, or embedded:<name>"),
    system_prompt: Optional[str] = typer.Option(None, "--system-prompt", "-s", help="a system turn to put first"),
    debug: bool = typer.Option(False, "--debug", help="show the full traceback on failure"),
) -> None:
    """Print Magpie's pre-query template for MODEL, derived from its chat template, and what ends the
    user turn: check it before spending GPU hours. JSON, with the prefix also shown as a Python string."""
    try:
        from thresher.generators.magpie_template import pre_query_template
        from thresher.generators.model_files import load_tokenizer, resolve_model_path

        folder = Path(model).expanduser()  # a folder of tokenizer files alone has no weights to fingerprint
        tokenizer = load_tokenizer(folder if folder.is_dir() else resolve_model_path(model)[0])
        pre = pre_query_template(tokenizer, system_prompt)
        typer.echo(json.dumps({"pre_query": pre.text, "end_of_turn": pre.end_of_turn,
                               "end_of_turn_ids": list(pre.end_of_turn_ids), "system_prompt": pre.system_prompt},
                              ensure_ascii=False, indent=2))
        typer.echo(f"pre-query: {pre.text!r}")
    except BaseException as err:
        _fail(err, debug)


@app.command("kd-check")
def kd_check(
    out: Path = typer.Argument(..., help="an output folder with KD labels (kd_logprobs / kd_generate)"),
    student: str = typer.Option(..., "--student", help="the student model (or a folder of its tokenizer files)"),
    debug: bool = typer.Option(False, "--debug", help="show the full traceback on failure"),
) -> None:
    """Check that STUDENT's tokenizer gives the teacher's token ids, as logit-level KD needs: exit 0 when
    it does, 2 (with what differs) when it does not."""
    try:
        from thresher.generators.model_files import load_tokenizer, resolve_model_path
        from thresher.generators.tokenizer_fingerprint import chat_template_digest
        from thresher.schemas.kd_reader import KDTokenizerMismatch, check_student_tokenizer, read_kd_metadata_of

        folder = Path(student).expanduser()
        tokenizer = load_tokenizer(folder if folder.is_dir() else resolve_model_path(student)[0])
        try:
            check_student_tokenizer(out, tokenizer)
        except KDTokenizerMismatch as err:
            typer.echo(f"thresher: kd-check: {err}", err=True)
            raise typer.Exit(code=2)
        for teacher in read_kd_metadata_of(out):
            typer.echo(f"ok: {student} shares the tokenizer of {teacher['teacher']} "
                       f"({teacher['tokenizer']['vocab_size']} entries, fingerprint {teacher['tokenizer']['digest']}), "
                       f"k={teacher['k']}, {teacher['mode']}")
            if teacher.get("chat_template_digest") != chat_template_digest(tokenizer):
                typer.echo("note: the student's chat template differs from the teacher's; the labels are aligned "
                           "to the stored kd_prompt_token_ids / kd_token_ids, so train on those ids")
    except typer.Exit:
        raise
    except BaseException as err:
        _fail(err, debug)


@app.command()
def report(
    out: Path = typer.Argument(..., help="the output folder of a finished run (with its manifest.json)"),
    debug: bool = typer.Option(False, "--debug", help="show the full traceback on failure"),
) -> None:
    """Render OUT/report.md and its figures (OUT/report/*.png) again from OUT/manifest.json and the
    output's Parquet; nothing is recomputed."""
    manifest_path = out / "manifest.json"
    if not manifest_path.is_file():
        typer.echo(f"thresher: error: {manifest_path} not found: is {out} the output folder of a finished run?", err=True)
        raise typer.Exit(code=1)
    try:
        from thresher.schemas.report import render_report
        from thresher.schemas.writers import write_text_atomic

        manifest = json.loads(manifest_path.read_text())
        write_text_atomic(out / "report.md", render_report(manifest, out))
        figures = sorted((out / "report").glob("*.png"))
        typer.echo(f"wrote {out / 'report.md'} and {len(figures)} figures in {out / 'report'}")
    except BaseException as err:
        _fail(err, debug)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()

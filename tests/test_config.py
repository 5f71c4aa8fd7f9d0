"""Config: YAML into pydantic models; every mistake is named before any work starts."""

import ast

import pytest

from thresher.flows.curate import apply_overrides
from thresher.flows.registry import build_stage, load_config, parse_config, source_entries
from thresher.schemas.config import ConfigError


def _write(tmp_path, text):
    path = tmp_path / "pipeline.yaml"
    path.write_text(text)
    return path


def test_example_configs_load(repo_root):
    for path in sorted((repo_root / "examples").glob("*.yaml")):
        if path.name.startswith("llm2llm"):
            continue  # a loop config, not a pipeline: tests/test_llm2llm_config.py loads it
        config = load_config(path)
        assert config.inputs or source_entries(config), path  # rows to read, or a stage that makes them
        assert all(p.startswith("/") for p in config.inputs)  # resolved against the file's folder


def test_unknown_top_level_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"shard_row: unknown key"):
        load_config(_write(tmp_path, "inputs: [a.json]\nshard_row: 10\n"))


def test_wrong_type_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"shard_rows: .*integer"):
        load_config(_write(tmp_path, "inputs: [a.json]\nshard_rows: lots\n"))
    with pytest.raises(ConfigError, match=r"ingest.format: .*unknown format 'xml'"):
        load_config(_write(tmp_path, "inputs: [a.json]\ningest: {format: xml}\n"))


def test_stage_mistakes_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"stages\[1\].stage: unknown stage 'dedupe'"):
        load_config(_write(tmp_path, "stages: [{stage: validate}, {stage: dedupe}]\n"))
    with pytest.raises(ConfigError, match=r"stages\[0\] \(select\)\.budgt: unknown key"):
        load_config(_write(tmp_path, "stages: [{stage: select, budgt: 3}]\n"))
    with pytest.raises(ConfigError, match=r"stages\[0\] \(select\)\.where"):
        load_config(_write(tmp_path, "stages: [{stage: select, where: ['score is big']}]\n"))


def test_a_renamed_key_names_the_new_one(tmp_path):
    renamed = r"stages\[0\] \(grape\)\.chunk_rows: unknown key \(renamed: use 'chunk_size'\)"
    with pytest.raises(ConfigError, match=renamed):
        load_config(_write(tmp_path, "stages: [{stage: grape, chunk_rows: 64}]\n"))
    config = load_config(_write(tmp_path, "stages: [{stage: grape, chunk_size: 64}]\n"))
    assert config.stages[0].params.chunk_size == 64


def test_not_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "inputs: [a.json\n"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_resource_knobs_stay_out_of_stage_identity():
    a = parse_config({"stages": [{"stage": "select", "budget": 5, "resources": {"GPU": 1}, "retries": 0}]})
    b = parse_config({"stages": [{"stage": "select", "budget": 5}]})
    c = parse_config({"stages": [{"stage": "select", "budget": 6}]})
    identity = lambda cfg: build_stage(cfg.stages[0]).identity()  # noqa: E731
    assert identity(a) == identity(b)
    assert identity(a) != identity(c)


def test_model_stage_params_share_one_base_and_keep_their_cache_keys():
    from thresher.flows.registry import STAGES, stage_class
    from thresher.flows.stage import ModelStageParams

    with_models = sorted(n for n in STAGES if issubclass(stage_class(n).Params, ModelStageParams))
    assert with_models == ["clear", "clear_correct", "deita_complexity", "deita_embed", "deita_quality", "grape",
                           "kd_generate", "kd_logprobs",
                           "magpie", "magpie_dedup", "magpie_response", "magpie_tag", "semantic_dedup"]
    required = {"magpie": {"count": 4}}
    for name in with_models:
        a = parse_config({"stages": [{"stage": name, "request_cache": False, "request_cache_path": "/tmp/x.sqlite",
                                      **required.get(name, {})}]})
        b = parse_config({"stages": [{"stage": name, **required.get(name, {})}]})
        assert build_stage(a.stages[0]).identity() == build_stage(b.stages[0]).identity()
        assert "request_cache" not in build_stage(b.stages[0]).identity()["params"]
        assert "model" in build_stage(b.stages[0]).identity()["params"]


def test_source_stages_come_first_and_keep_finished_tasks_when_the_count_grows():
    with pytest.raises(ConfigError, match=r"stages\[1\] \(magpie\) makes rows from nothing; put it before"):
        parse_config({"stages": [{"stage": "validate"}, {"stage": "magpie", "count": 4}]})
    with pytest.raises(ValueError, match="begin the stages with a source stage"):
        apply_overrides(parse_config({"out": "/tmp/o", "stages": [{"stage": "validate"}]}))
    small, large = (build_stage(parse_config({"stages": [{"stage": "magpie", "count": n, "rows_per_task": 4}]}).stages[0])
                    for n in (10, 14))
    assert [(t.first, t.count) for t in small.tasks()] == [(0, 4), (4, 4), (8, 2)]
    assert [(t.first, t.count) for t in large.tasks()] == [(0, 4), (4, 4), (8, 4), (12, 2)]
    assert [small.task_identity(t) for t in small.tasks()[:2]] == [large.task_identity(t) for t in large.tasks()[:2]]
    assert small.task_identity(small.tasks()[2]) != large.task_identity(large.tasks()[2])


def _imported_modules(path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            yield node.module or ""


def test_schemas_never_import_flows(repo_root):
    """The dependency goes one way: flows use schemas, never the other way (not even inside a function)."""
    modules = sorted((repo_root / "schemas").glob("*.py"))
    assert modules
    offenders = {p.name: m for p in modules for m in _imported_modules(p)
                 if m == "thresher.flows" or m.startswith("thresher.flows.")}
    assert offenders == {}

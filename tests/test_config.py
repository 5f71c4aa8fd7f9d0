"""Config: YAML into pydantic models; every mistake is named before any work starts."""

import pytest

from thresher.schemas.config import ConfigError, load_config, parse_config


def _write(tmp_path, text):
    path = tmp_path / "pipeline.yaml"
    path.write_text(text)
    return path


def test_example_configs_load(repo_root):
    for path in sorted((repo_root / "examples").glob("*.yaml")):
        config = load_config(path)
        assert config.inputs, path
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


def test_not_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "inputs: [a.json\n"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_resource_knobs_stay_out_of_stage_identity():
    a = parse_config({"stages": [{"stage": "select", "budget": 5, "resources": {"GPU": 1}, "retries": 0}]})
    b = parse_config({"stages": [{"stage": "select", "budget": 5}]})
    c = parse_config({"stages": [{"stage": "select", "budget": 6}]})
    identity = lambda cfg: cfg.stages[0].build().identity()  # noqa: E731
    assert identity(a) == identity(b)
    assert identity(a) != identity(c)

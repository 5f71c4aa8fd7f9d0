"""The LLM2LLM loop's config: clear errors naming the key, paths resolved against the config file."""

from __future__ import annotations

import pytest

from thresher.llm2llm.config import load_llm2llm_config, validate_llm2llm_config
from thresher.schemas.config import ConfigError

BASE = {"seeds": {"inputs": ["seeds.jsonl"]}, "student": "embedded:gemma-3-270m",
        "teacher": {"model": "embedded:smollm2-135m-instruct"}}


@pytest.mark.parametrize("change, message", [
    ({"iteratons": 2}, "iteratons: unknown key"),
    ({"student": {"name": "x", "backend": "openai", "base_url": "http://h/v1"}}, "use the hf or vllm backend"),
    ({"grader": "gsm9k"}, "unknown grader 'gsm9k'"),
    ({"trainer": {"epochs": 0}}, "epochs"),
    ({"teacher": {"model": "embedded:smollm2-135m-instruct", "m": 0}}, "teacher.m"),
    ({"seeds": {"inputs": []}}, "seeds.inputs"),
    ({"teacher": {"model": {"name": "t", "backend": "openai", "api_key": "sk-1"}}}, "api_key"),
])
def test_config_errors_name_the_key(change, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        validate_llm2llm_config({**BASE, **change})


def test_example_config_paths_resolve(repo_root):
    config = load_llm2llm_config(repo_root / "examples" / "llm2llm_gsm8k.yaml")
    assert config.seeds.inputs == [str((repo_root.parent / "shared/data/gsm8k/train.jsonl").resolve())]
    assert config.out == str((repo_root / "llm2llm-out").resolve())
    assert config.iterations == 2 and config.teacher.response_prefix == "1. Question:"

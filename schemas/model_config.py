"""How a pipeline names a model: which weights, which backend, which resource knobs.

In YAML a model is either a string (``embedded:smollm2-135m-instruct``, a local
path, or a Hugging Face repo id already on disk) or a mapping::

    model:
      name: embedded:gemma-3-270m
      backend: hf            # hf | openai | vllm
      device: cpu            # hf: cpu | cuda | auto
      batch_size: 16         # resource knob: never part of a cache key

Only :meth:`ModelConfig.semantic_fields` enter cache keys; batch sizes,
concurrency, threads and devices are resource knobs and do not.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from thresher.schemas.secrets import refuse_secret_keys


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    name: str = Field(description="embedded:<name>, a local directory, or a model id")
    backend: Literal["hf", "openai", "vllm"] = "hf"
    revision: str | None = None
    tokenizer: str | None = Field(
        default=None,
        description="tokenizer to use when the backend cannot give one (openai): embedded name or path",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_model_len: int | None = None
    # openai backend
    base_url: str | None = None
    api_key_env: str = Field(
        default="OPENAI_API_KEY",
        description="openai: the environment variable holding the API key (a key is never written in a "
                    "config; schemas/secrets.py). Unset: requests carry no key (a local server)")
    served_model_name: str | None = None
    # resource knobs (not in cache keys)
    device: str = "auto"
    batch_size: int = Field(default=16, ge=1)
    max_batch_tokens: int = Field(default=16384, ge=64)
    threads: int | None = None
    max_concurrency: int = Field(default=8, ge=1)
    timeout_s: float = Field(default=120.0, gt=0)
    max_retries: int = Field(default=4, ge=0)
    gpu_memory_utilization: float = Field(default=0.85, gt=0, le=1)
    kv_cache_gb: float | None = Field(
        default=None, gt=0,
        description="vllm: the KV cache's size in GiB (default: gpu_memory_utilization's share of a GPU; "
                    "2 GiB on a CPU, where that share would be of the machine's RAM)",
    )
    enforce_eager: bool | None = Field(
        default=None,
        description="vllm: no torch.compile / CUDA graphs (default: on CPUs, where compiling costs a "
                    "minute per load and gains little; off on GPUs)",
    )

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"name": value}
        if isinstance(value, dict):
            refuse_secret_keys(value, "model")
        return value

    def semantic_fields(self) -> dict[str, Any]:
        """What changes a model's outputs: enters (stage, shard) cache keys."""
        return {
            "name": self.name,
            "backend": self.backend,
            "revision": self.revision,
            "tokenizer": self.tokenizer,
            "dtype": self.dtype,
            "max_model_len": self.max_model_len,
            "served_model_name": self.served_model_name,
        }

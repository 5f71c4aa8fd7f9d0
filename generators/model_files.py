"""Where a model's files are, and what identifies them: no torch imported here.

:func:`resolve_model_path` turns the ``name`` of a ``model:`` entry (an
``embedded:`` name, a local folder, or a Hugging Face repo id already in the
local cache) into a folder ``from_pretrained`` can load, the kind of model it
holds, and an identity string that enters request-cache keys. Nothing is ever
downloaded.

Every backend resolves its model (and its ``tokenizer:``) through here. The
module imports neither torch nor transformers, so a process that only talks to
a server (the ``openai`` backend) can name and load its tokenizer without paying
for a torch import (:func:`load_tokenizer` imports transformers when called, and
avoids ``AutoTokenizer``, which imports torch).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from thresher.generators.base import BackendKind, ModelError
from thresher.generators.embedded import ModelKind, is_embedded, resolve_embedded


def fingerprint(folder: Path) -> str:
    """sha256[:12] over a model folder's config.json text and weights file names + sizes."""
    h = hashlib.sha256()
    cfg = folder / "config.json"
    if cfg.is_file():
        h.update(cfg.read_bytes())
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.suffix in {".safetensors", ".bin", ".gguf"}:
            h.update(f"{p.relative_to(folder)}:{p.stat().st_size}".encode())
    return h.hexdigest()[:12]


def resolve_model_path(name: str, revision: str | None = None) -> tuple[Path, ModelKind, str]:
    """``(directory, kind, identity)`` for an embedded name, a local folder or a cached hub id.

    ``kind`` is ``"sentence-transformer"`` (a folder with ``modules.json``) or
    ``"causal-lm"``. Nothing is ever downloaded: a hub id must already be in the
    local Hugging Face cache.
    """
    if is_embedded(name):
        r = resolve_embedded(name)
        return r.path, r.kind, r.identity
    local = Path(name).expanduser()
    if local.is_dir():
        path = local.resolve()
        ident = f"{path}@{fingerprint(path)}"
    else:
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(name, revision=revision, local_files_only=True))
        except Exception as exc:  # not in the local cache, or not a repo id at all
            raise ModelError(
                f"model {name!r} is neither an embedded model, a local folder, nor a "
                f"Hugging Face repo already on disk; thresher never downloads at run time "
                f"(fetch it first, e.g. `huggingface-cli download {name}`): {exc}"
            ) from exc
        ident = f"{name}@{path.name}"  # the snapshot folder is named by its commit
    kind: ModelKind = "sentence-transformer" if (path / "modules.json").is_file() else "causal-lm"
    return path, kind, ident


def backend_kind(file_kind: str) -> BackendKind:
    """The :attr:`~thresher.generators.base.ModelBackend.kind` of a model whose files are ``file_kind``."""
    return "embedding" if file_kind == "sentence-transformer" else "causal-lm"


def load_tokenizer(path: Path | str) -> object:
    """The Hugging Face tokenizer in a resolved folder (local files only), without importing torch.

    ``AutoTokenizer`` imports torch whenever it is installed (through the model config), so
    the class the folder's ``tokenizer_config.json`` names (``tokenizer_class``, e.g.
    ``GemmaTokenizer``, ``TokenizersBackend``) is taken straight from transformers: the class
    ``AutoTokenizer`` itself resolves that name to (checked on the embedded models: same class,
    ids, chat template and special tokens). A folder that names none, or a class transformers
    does not export, goes through ``AutoTokenizer``.
    """
    import transformers

    config = Path(path) / "tokenizer_config.json"
    name = json.loads(config.read_text()).get("tokenizer_class") if config.is_file() else None
    cls = None
    if isinstance(name, str) and name.isidentifier():  # AutoTokenizer's order: the fast variant first
        cls = getattr(transformers, f"{name}Fast", None) or getattr(transformers, name, None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        cls = transformers.AutoTokenizer
    return cls.from_pretrained(path, local_files_only=True)

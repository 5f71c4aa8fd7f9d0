"""The content-addressed work store: one folder per finished (stage, key).

A key is a digest of everything that decides a result (input digest, stage
version, semantic parameters, model identity). A finished key is never
recomputed; a result is written to a temporary folder and renamed into place,
so a killed run leaves either the whole result or nothing, and resumes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

DONE_FILE = "result.json"


def digest(value: Any) -> str:
    """A stable hex digest of a JSON-serializable value."""
    text = json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, or of every file in a folder (names and bytes)."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        h.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


class Store:
    """Results under ``root/<stage>/<key>/`` with tables as Parquet and a ``result.json``."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def is_done(self, stage: str, key: str) -> bool:
        return (self.path(stage, key) / DONE_FILE).exists()

    def read_info(self, stage: str, key: str) -> dict[str, Any]:
        return json.loads((self.path(stage, key) / DONE_FILE).read_text())

    def read_table(self, stage: str, key: str, name: str) -> pa.Table | None:
        file = self.path(stage, key) / f"{name}.parquet"
        return pq.read_table(file) if file.exists() else None

    def write(self, stage: str, key: str, tables: dict[str, pa.Table | None], info: dict[str, Any]) -> None:
        """Write a finished result atomically (temp folder + rename); first writer wins."""
        if self.is_done(stage, key):
            return
        with self.staging(stage, key) as tmp:
            for name, table in tables.items():
                if table is not None:
                    pq.write_table(table, tmp / f"{name}.parquet")
            self.commit(stage, key, tmp, info)

    @contextmanager
    def staging(self, stage: str, key: str) -> Iterator[Path]:
        """A fresh temporary folder to write a result's files into (``<name>.parquet``, read
        back by :meth:`read_table`), bit by bit if need be; :meth:`commit` it when they are
        all written. It is removed on the way out, so a failure leaves nothing behind."""
        tmp = self.root / ".tmp" / f"{stage}-{key}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def commit(self, stage: str, key: str, tmp: Path, info: dict[str, Any]) -> None:
        """Finish a result written into ``tmp`` (from :meth:`staging`): ``result.json`` last,
        then one rename into place; first writer wins."""
        final = self.path(stage, key)
        (tmp / DONE_FILE).write_text(json.dumps(info, indent=1, sort_keys=True, default=str))
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists() and not self.is_done(stage, key):  # an unfinished leftover: replace it
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if not self.is_done(stage, key):  # lost a race to a writer that did not finish
                raise

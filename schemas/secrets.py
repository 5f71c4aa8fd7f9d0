"""What is secret, in one place: credentials come from the environment and never leave the process.

A credential (an API key, a Hugging Face token) is never written in a config: configs are
copied into the manifest, sent to Prefect as flow and task parameters (stored in its
database, shown in its UI) and shared with the output. A config names the environment
variable instead (``api_key_env``, default ``OPENAI_API_KEY`` as the openai SDK does), and
the backend reads it in the process that makes the request.

- :data:`SECRET_KEYS`: config keys that would hold a credential; a config that sets one
  anywhere is refused with a one-line error naming where (:func:`secret_key_paths`, checked by
  :func:`thresher.schemas.config.validate_config`; :func:`refuse_secret_keys` for a model
  config made in code).
- :data:`SECRET_ENV`: environment variables whose values are credentials, plus any a config
  names (:func:`register_secret_env`).
- :func:`redact`: a text with every credential value replaced by ``***``. The manifest and
  report writers pass their text through it, the CLI its error line, and
  :func:`install_log_redaction` every log record of the process (messages, arguments and
  tracebacks), whoever logs it: thresher, httpx, Prefect, Dask.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable, Mapping
from typing import Any

#: config keys that would hold a credential in clear (refused in configs)
SECRET_KEYS = ("api_key", "token", "hf_token", "password", "secret")
#: environment variables whose values are always treated as credentials
SECRET_ENV = {"OPENAI_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "ANTHROPIC_API_KEY"}
#: shorter values are not redacted (they would match ordinary text)
MIN_SECRET_CHARS = 8
REDACTED = "***"

_lock = threading.Lock()
_installed = False


def register_secret_env(names: Iterable[str]) -> None:
    """Treat the values of these environment variables as credentials too (e.g. a config's ``api_key_env``)."""
    with _lock:
        SECRET_ENV.update(n for n in names if n)


def secret_values() -> list[str]:
    """The credential values set in this process's environment, longest first."""
    values = {os.environ.get(name, "") for name in SECRET_ENV}
    return sorted((v for v in values if len(v) >= MIN_SECRET_CHARS), key=len, reverse=True)


def redact(text: str) -> str:
    """``text`` with every credential value of :func:`secret_values` replaced by ``***``."""
    for value in secret_values():
        if value in text:
            text = text.replace(value, REDACTED)
    return text


def refuse_secret_keys(data: Mapping[str, Any], where: str, env_key: str = "api_key_env") -> None:
    """Raise ``ValueError`` (without the value) when ``data`` sets a credential in clear."""
    for key in SECRET_KEYS:
        if data.get(key) is not None:
            raise ValueError(
                f"{where}: '{key}' in a config is refused: a config is copied into the manifest and "
                f"Prefect's database; put the key in an environment variable and name it with "
                f"'{env_key}' (default OPENAI_API_KEY)")


def secret_key_paths(data: Any, path: str = "") -> list[str]:
    """Where a config mapping (nested mappings and lists too) sets a key of :data:`SECRET_KEYS`."""
    found = []
    if isinstance(data, Mapping):
        for key, value in data.items():
            where = f"{path}.{key}" if path else str(key)
            if key in SECRET_KEYS and value is not None:
                found.append(where)
            found += secret_key_paths(value, where)
    elif isinstance(data, list):
        for i, value in enumerate(data):
            found += secret_key_paths(value, f"{path}[{i}]")
    return found


def install_log_redaction() -> None:
    """Redact credentials from every log record made in this process from now on (idempotent)."""
    global _installed
    with _lock:
        if _installed:
            return
        make_record = logging.getLogRecordFactory()

        def redacting_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = make_record(*args, **kwargs)
            if not secret_values():
                return record
            message = record.getMessage()
            clean = redact(message)
            if clean != message:
                record.msg, record.args = clean, ()
            if record.exc_info and record.exc_info[0] is not None:
                text = logging.Formatter().formatException(record.exc_info)
                record.exc_text = redact(text)  # formatters use exc_text when it is set
            return record

        logging.setLogRecordFactory(redacting_factory)
        _installed = True

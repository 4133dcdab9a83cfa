"""Where a backbone or tokenizer comes from, and which attention kernel it runs: the one place that decides.

Source resolution (:func:`resolve_source`), before anything is loaded:

1. ``embedded`` names → the offline SmolLM2 package (handled by the caller).
2. An existing path (relative to ``root`` when given, else the working directory) → that folder.
3. A value that *looks local* and does not exist → :class:`BackboneLoadError` at once, naming it. It looks
   local when it is absolute, starts with ``./``, ``../``, ``~`` or ``.``, contains a backslash, has more
   than one ``/``, is not of the hub form ``owner/name`` (``[A-Za-z0-9._-]``), or is ``first/rest`` with a
   ``first`` that is an existing local folder (``models/backbone`` before the backbone stage ran).
4. Otherwise a hub id. If ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set, or the hub endpoint
   cannot be reached (one TCP connect, :data:`PROBE_TIMEOUT_S` seconds, through ``HTTPS_PROXY`` if set),
   the model must already be in the local Hugging Face cache: then it is loaded with
   ``local_files_only=True``; if not, :class:`BackboneLoadError` with the hint to set a local path — instead
   of ~50 s of connection retries.

Attention (:func:`resolve_attn_implementation`): ``auto`` = ``flash_attention_2`` when the ``flash_attn``
package is importable, CUDA is available and the dtype is 16-bit (FlashAttention has no fp32 or CPU kernel);
otherwise ``sdpa``. ``eager``, ``sdpa`` and ``flash_attention_2`` are passed as given (an explicit
``flash_attention_2`` without the package is a :class:`BackboneLoadError` naming the install line).
"""

from __future__ import annotations

import importlib.util
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

ATTN_IMPLEMENTATIONS = ("auto", "eager", "sdpa", "flash_attention_2")
PROBE_TIMEOUT_S = 3.0
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9._-]+)?$")
_TRUE = {"1", "true", "yes", "on"}


class BackboneLoadError(RuntimeError):
    """A backbone or tokenizer that cannot be loaded, as one line naming it and what to do (exit 2 in stages)."""


@dataclass(frozen=True)
class ModelSource:
    """Where to load from: ``path`` (a local folder or a hub id) and whether only the local cache may be used."""

    path: str
    local: bool  # an existing local path
    local_files_only: bool = False


def check_attn_implementation(value: str | None) -> str:
    """``value`` (``None`` = ``auto``) if it is one of :data:`ATTN_IMPLEMENTATIONS`, else ``ValueError``."""
    value = value or "auto"
    if value not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation {value!r}; allowed: {', '.join(ATTN_IMPLEMENTATIONS)}")
    return value


def flash_attn_available() -> bool:
    """The ``flash_attn`` package is importable (checked without importing it)."""
    return importlib.util.find_spec("flash_attn") is not None


def resolve_attn_implementation(value: str | None, dtype: Any = None) -> str:
    """The attention implementation to pass to ``from_pretrained`` (see the module docstring)."""
    value = check_attn_implementation(value)
    if value == "flash_attention_2" and not flash_attn_available():
        raise BackboneLoadError(
            "attn_implementation flash_attention_2 needs the flash_attn package, installed after torch: "
            "pip install flash-attn --no-build-isolation (or use auto: flash_attention_2 when usable, else sdpa)"
        )
    if value != "auto":
        return value
    import torch

    sixteen_bit = dtype is None or dtype == "auto" or dtype in (torch.float16, torch.bfloat16, "float16", "bfloat16")
    if flash_attn_available() and torch.cuda.is_available() and sixteen_bit:
        return "flash_attention_2"
    return "sdpa"


def _looks_local(value: str, base: Path) -> bool:
    if os.path.isabs(value) or value.startswith(("./", "../", "~", ".")) or "\\" in value:
        return True
    if value.count("/") > 1 or not _HUB_ID.match(value):
        return True
    first = value.split("/", 1)[0]
    return "/" in value and (base / first).is_dir()


def _offline_env() -> bool:
    return any(os.environ.get(k, "").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> tuple[bool, str]:
    """(reachable, reason): one TCP connect to the hub endpoint (or the HTTPS proxy, when one is set)."""
    from huggingface_hub import constants

    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    url = urlparse(proxy or constants.ENDPOINT)
    host = url.hostname or "huggingface.co"
    port = url.port or (443 if url.scheme in ("https", "") else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True, ""
    except OSError as err:
        return False, f"{host}:{port}: {err.strerror or err}"


def _in_cache(repo_id: str, filenames: tuple[str, ...]) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(repo_id, f), str) for f in filenames)


def resolve_source(
    name_or_path: str,
    root: str | os.PathLike | None = None,
    what: str = "backbone",
    cache_files: tuple[str, ...] = ("config.json",),
) -> ModelSource:
    """Decide where ``name_or_path`` is loaded from, or raise :class:`BackboneLoadError` (module docstring).

    ``root`` is the folder relative paths are taken against (the params file's folder in the stages);
    ``what`` names the setting in messages (e.g. ``train.backbone``); ``cache_files`` are the files whose
    presence in the hub cache means the model can be loaded offline.
    """
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise BackboneLoadError(f"{what}: empty name or path")
    base = Path(root) if root is not None else Path.cwd()
    candidate = Path(os.path.expanduser(name_or_path))
    if not candidate.is_absolute():
        candidate = base / candidate
    if candidate.exists():
        if not candidate.is_dir():
            raise BackboneLoadError(f"{what} {name_or_path!r}: {candidate} is a file, expected a model folder")
        return ModelSource(str(candidate), local=True)
    if _looks_local(name_or_path, base):
        raise BackboneLoadError(
            f"{what} {name_or_path!r}: no such folder ({candidate}); it looks like a local path, so the hub is "
            "not asked (run the stage that writes it, or fix the path)"
        )
    hint = f"set {what} to a local folder (e.g. models/backbone from the backbone stage)"
    if _offline_env():
        if _in_cache(name_or_path, cache_files):
            return ModelSource(name_or_path, local=False, local_files_only=True)
        raise BackboneLoadError(
            f"{what} {name_or_path!r}: not a local folder and not in the Hugging Face cache, and HF_HUB_OFFLINE "
            f"is set; {hint}, or download it on a machine with network access"
        )
    ok, reason = hub_reachable()
    if not ok:
        if _in_cache(name_or_path, cache_files):
            return ModelSource(name_or_path, local=False, local_files_only=True)
        raise BackboneLoadError(
            f"{what} {name_or_path!r}: not a local folder, and the Hugging Face hub cannot be reached ({reason}); "
            f"{hint}, or set HF_HUB_OFFLINE=1 with the model in the cache"
        )
    return ModelSource(name_or_path, local=False)


def one_line(err: BaseException) -> str:
    """The first non-empty line of an exception's message (transformers' errors span several lines)."""
    text = str(err).strip()
    return next((ln.strip() for ln in text.splitlines() if ln.strip()), type(err).__name__)

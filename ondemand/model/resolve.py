"""Turn a model spec (a local directory or a ModelScope id) into a local directory.

Already-cached models resolve without touching the network (modelscope `local_files_only`), so
offline machines work; otherwise `snapshot_download(..., revision="master")` fetches it with a
progress bar.  Every failure becomes one ModelNotFoundError that says how to fix it."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from ondemand.errors import ModelNotFoundError

log = logging.getLogger(__name__)

OFFLINE_ENV = "ONDEMAND_OFFLINE"


def looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", ".", "~")) or Path(spec).exists()


def resolve_model(
    spec: str,
    *,
    revision: str = "master",
    cache_dir: str | None = None,
    force: bool = False,
    offline: bool | None = None,
) -> Path:
    """Local directory for `spec`.  `force` deletes a cached copy and downloads it again."""
    if looks_like_path(spec):
        path = Path(spec).expanduser()
        if not path.is_dir():
            raise ModelNotFoundError(
                f"model directory {spec} does not exist; pass a directory holding model.pt, "
                "tokens.txt and config.yaml, or a ModelScope id such as iic/emotion2vec_plus_large"
            )
        return path
    if spec.count("/") != 1:
        raise ModelNotFoundError(
            f"{spec!r} is neither an existing directory nor a ModelScope id (owner/name, "
            "e.g. iic/emotion2vec_plus_large)"
        )
    if offline is None:
        offline = os.environ.get(OFFLINE_ENV, "") not in ("", "0")
    cached = _cached(spec, revision, cache_dir)
    if cached is not None and force:
        log.warning("model %s: deleting cached copy %s to download it again", spec, cached)
        shutil.rmtree(cached)
        cached = None
    if cached is not None:
        log.info("model %s revision=%s resolved from cache %s", spec, revision, cached)
        return cached
    if offline:
        raise ModelNotFoundError(
            f"model {spec} is not in the cache ({cache_dir or 'ModelScope default'}) and "
            f"{OFFLINE_ENV} is set; download it once with network access "
            f"(`ondemand infer --model {spec} ...`) or set model.path to a local copy"
        )
    return _download(spec, revision, cache_dir)


def _cached(spec: str, revision: str, cache_dir: str | None) -> Path | None:
    try:
        from modelscope import snapshot_download
    except ImportError:
        return None
    try:
        path = snapshot_download(
            spec, revision=revision, cache_dir=cache_dir, local_files_only=True
        )
    except Exception:  # modelscope raises its own hierarchy for "not cached"
        return None
    p = Path(path)
    return p if p.is_dir() and any(p.iterdir()) else None


def _download(spec: str, revision: str, cache_dir: str | None) -> Path:
    try:
        from modelscope import snapshot_download
    except ImportError as e:
        raise ModelNotFoundError(
            "downloading models needs the modelscope package: pip install modelscope"
        ) from e
    log.info(
        "model %s revision=%s: downloading from ModelScope (about 2 GB for large)", spec, revision
    )
    try:
        path = snapshot_download(spec, revision=revision, cache_dir=cache_dir)
    except Exception as e:
        raise ModelNotFoundError(
            f"could not download model {spec} (revision {revision}) from ModelScope: "
            f"{type(e).__name__}: {e}. Check the network and the model id, or download it "
            "elsewhere and set model.path (--model DIR) to the directory"
        ) from e
    return Path(path)

"""Where cached data and models live, and how files reach it whole."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path


def cache_root() -> Path:
    """$FEDJAX_CODE_CACHE, or ~/.cache/fedjax-code."""
    return Path(os.environ.get("FEDJAX_CODE_CACHE", Path.home() / ".cache" / "fedjax-code"))


def use_compilation_cache() -> None:
    """Keep JAX's compiled programs under the cache (``jax/``) unless $JAX_COMPILATION_CACHE_DIR says where:
    a second run of the same shapes (a resumed sweep, another evaluation of the same model) skips compiling."""
    import jax

    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", str(cache_root() / "jax"))


@contextlib.contextmanager
def building(target: Path):
    """Yield a fresh path beside ``target`` to build a file or directory in; on success it replaces ``target``
    (an old directory is deleted only then). On failure nothing is left behind and ``target`` is untouched."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent)) / target.name
    try:
        yield tmp
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def file_sha256(path: Path) -> str:
    """The hex sha256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()

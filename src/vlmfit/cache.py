"""THE owner of vlmfit's caches: where they live ($VLMFIT_CACHE, else ~/.cache/vlmfit), their sub-directories, and
what every cached result is keyed by besides its own inputs: vlmfit's code and the versions of the libraries."""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import os
import stat
from pathlib import Path

PACKAGE = Path(__file__).parent
# The sub-directories of the cache root, one per cache: prepared data (data/prepare.py), encoded examples
# (chat/rows.py), evaluation results (evaluate/eval.py), generated builtin data (data/builtin.py), the tiny zoo.
NAMES = ("prepared", "encoded", "evals", "builtin", "tiny")
# The libraries that read, decode, tokenize or encode what a cached entry holds.
LIBRARIES = ("transformers", "tokenizers", "Pillow", "datasets", "pyarrow", "torch", "numpy", "av")
# Not part of the code fingerprint: the two top layers only parse and orchestrate, and tests/test_architecture.py
# guarantees no module below them (where every cached result is computed) imports them.
_NOT_CACHED_CODE = ("cli.py", "__main__.py", "train")


def cache_root() -> Path:
    """The root of every vlmfit cache: $VLMFIT_CACHE, else ~/.cache/vlmfit."""
    return Path(os.environ.get("VLMFIT_CACHE") or Path.home() / ".cache" / "vlmfit")


def cache_dir(name: str, root: str | os.PathLike | None = None) -> Path:
    """The directory of one cache (one of NAMES) under `root`, by default cache_root()."""
    if name not in NAMES:
        raise ValueError(f"unknown cache '{name}' (caches: {', '.join(NAMES)})")  # a programming error, not a user's
    return Path(root if root is not None else cache_root()) / name


def code_files() -> list[Path]:
    """The vlmfit modules a cached result may depend on: the whole package but its top two layers (cli, train)."""
    return sorted(p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).parts[0] not in _NOT_CACHED_CODE)


@functools.cache
def code_fingerprint() -> str:
    """One digest of the source of code_files(), shared by every cache: any edit there (a label rule, a family fact,
    a metric, the data pipeline) makes every cached result a miss. Hashed once per process."""
    h = hashlib.blake2b(digest_size=16)
    for path in code_files():
        h.update(str(path.relative_to(PACKAGE)).encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    return h.hexdigest()


def library_versions() -> dict[str, str | None]:
    """Installed versions of LIBRARIES (None where one is not installed: av is optional)."""
    return dict(_versions())


@functools.cache
def _versions() -> tuple[tuple[str, str | None], ...]:
    found = []
    for name in LIBRARIES:
        try:
            found.append((name, importlib.metadata.version(name)))
        except importlib.metadata.PackageNotFoundError:
            found.append((name, None))
    return tuple(found)


def file_digest(path: Path) -> str:
    """Content hash of one file (annotation files, tokenizer and processor files: small, and edited in place)."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def file_stat(path: Path) -> list[int] | None:
    """[size, mtime_ns] of a file (None where there is none): what a cache key reads of images, videos and weights,
    too large to hash on every run; overwriting one changes its mtime."""
    try:
        st = path.stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns] if stat.S_ISREG(st.st_mode) else None

"""JAX's persistent compilation cache for the generator and the CLI, on by default.

A second run with the same shapes then loads its compiled prefill and decode from disk instead of compiling
them again. Where: ``$GEMMA3_JAX_COMPILATION_CACHE`` if set (a directory; ``0``, ``off`` or an empty value turn
the cache off), else ``xla/`` under the project's cache directory (``$GEMMA3_JAX_CACHE``, else
``~/.cache/gemma3_jax``). A cache directory that JAX was already given (``JAX_COMPILATION_CACHE_DIR`` or
``jax.config``) is left as it is.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ENV = "GEMMA3_JAX_COMPILATION_CACHE"
_OFF = ("", "0", "off", "false", "no", "none")
MIN_COMPILE_S = 0.2
MAX_BYTES = 4 * 2**30


def compilation_cache_dir() -> Path | None:
    """The directory the cache would use, None when turned off."""
    value = os.environ.get(ENV)
    if value is not None and value.strip().lower() in _OFF:
        return None
    if value:
        return Path(value).expanduser()
    from gemma3_jax.checkpoints.store import cache_root

    return cache_root() / "xla"


def enable_compilation_cache() -> Path | None:
    """Point JAX's persistent compilation cache at ``compilation_cache_dir()``; returns the directory in use.

    A directory that cannot be created is a note on stderr, not an error: generation works without the cache. JAX
    reads the setting at its first compilation, so this is called before anything compiles (the CLI does so first;
    ``Generator.from_pretrained`` before loading)."""
    import jax

    current = jax.config.jax_compilation_cache_dir
    if current:
        return Path(current)
    path = compilation_cache_dir()
    if path is None:
        return None
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(f"{path} is not writable")
    except OSError as e:
        print(f"note: compilation cache off ({ENV}={path}: {e})", file=sys.stderr)
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    # Keep the prefill and decode steps (JAX's 1 s threshold would miss small models' decode steps), not the small
    # eager ops of loading; bound the directory, oldest entries going first.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_S)
    if jax.config.jax_compilation_cache_max_size < 0:
        jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    return path

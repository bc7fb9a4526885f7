"""Converted ``.gguf`` checkpoints in the cache directory: keyed by the file's content, built aside, verified on use.

Layout under ``cache_root()`` (``$GEMMA3_JAX_CACHE``, else ``~/.cache/gemma3_jax``)::

    converted/<first 16 hex digits of the .gguf's sha256>/   a checkpoint directory, manifest.json written last
    converted/.<key>.lock                                    one conversion of a file at a time, across processes
    converted/.<key>.<pid>-<random>.tmp/                     a conversion in progress, renamed to <key> when complete
    converted/sha256.json                                    memo of file hashes (path, size, times, inode -> sha256)

A conversion is used only when its manifest matches (the source's sha256, every file's size, the safetensors
header length); otherwise it is removed and converted again with a one-line note on stderr. Temporary
directories whose process is gone are removed at the next resolve.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import struct
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # not on Windows: conversions there are not serialized, only renamed into place
    fcntl = None

FORMAT = 1  # bump when the converter's output changes: older conversions are then rebuilt
MANIFEST = "manifest.json"
FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
_MEMO, _MEMO_ENTRIES = "sha256.json", 256
_TMP = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)-[a-z0-9_]+\.tmp")
_LEGACY_TMP = re.compile(r"\.(gemma-3-270m|.+-\d+)\.[a-z0-9_]{8}")  # tempfile.mkdtemp names of older versions
_LEGACY_AGE_S = 3600.0


def cache_root() -> Path:
    """Where converted checkpoints live: ``$GEMMA3_JAX_CACHE``, else ``~/.cache/gemma3_jax``."""
    return Path(os.environ.get("GEMMA3_JAX_CACHE") or Path.home() / ".cache" / "gemma3_jax").expanduser()


def converted_dir() -> Path:
    return cache_root() / "converted"


def temp_dir_for(out: Path) -> Path:
    """A new empty directory beside ``out`` named after this process, so a later run can tell it is abandoned."""
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}-", suffix=".tmp", dir=out.parent))


# ---------------------------------------------------------------------------------------------- file hashes


def _stat_key(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def _read_memo(path: Path) -> dict:
    try:
        memo = json.loads(path.read_text()) if path.is_file() and path.stat().st_size < 1 << 20 else {}
    except (OSError, ValueError, RecursionError):  # a memo that cannot be read is no memo
        return {}
    return memo if isinstance(memo, dict) else {}


def file_sha256(path: str | Path, progress: bool = False) -> str:
    """The sha256 of a file, streamed.

    The result is memoized in ``converted/sha256.json`` by (resolved path, size, mtime, ctime, inode, device), so a
    large GGUF is not read again on every run; any write to the file changes its ctime and so forces a rehash."""
    path = Path(path).resolve()
    before = _stat_key(path.stat())
    memo_path = converted_dir() / _MEMO
    memo = _read_memo(memo_path)
    hit = memo.get(str(path))
    if isinstance(hit, dict) and hit.get("stat") == before and isinstance(hit.get("sha256"), str):
        return hit["sha256"]
    from tqdm.auto import tqdm

    digest, buf = hashlib.sha256(), bytearray(8 << 20)
    view = memoryview(buf)
    # The file as opened is what is hashed and checked: another process renaming a new file over the path meanwhile
    # (packaged_gguf's writers) leaves this one whole (only its ctime moves, as its last link goes), while a write
    # into it moves its mtime.
    unchanged = lambda key: key[:2] + key[3:]  # noqa: E731 - size, mtime, inode, device
    with open(path, "rb") as f:
        before = _stat_key(os.fstat(f.fileno()))
        with tqdm(total=before[0], unit="B", unit_scale=True, desc=f"hashing {path.name}",
                  disable=not progress or before[0] < 1 << 30, leave=False) as bar:
            while n := f.readinto(buf):
                digest.update(view[:n])
                bar.update(n)
        if unchanged(_stat_key(os.fstat(f.fileno()))) != unchanged(before):
            raise ValueError(f"{path} changed while it was being read; try again when nothing writes to it")
    sha = digest.hexdigest()
    memo.pop(str(path), None)
    memo[str(path)] = {"stat": before, "sha256": sha}
    for old in list(memo)[:-_MEMO_ENTRIES]:
        del memo[old]
    with contextlib.suppress(OSError):  # the memo only saves time: a read-only cache just rehashes
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{_MEMO}.{os.getpid()}-", suffix=".tmp", dir=memo_path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(memo, f)
            os.replace(tmp, memo_path)
        finally:
            Path(tmp).unlink(missing_ok=True)
    return sha


# ---------------------------------------------------------------------------------------------- manifest


def write_manifest(out: Path, sha256: str, source: Path) -> None:
    """Written last, after every other file: a directory with a matching manifest is complete."""
    files = {name: (out / name).stat().st_size for name in FILES}
    with open(out / "model.safetensors", "rb") as f:
        (header,) = struct.unpack("<Q", f.read(8))
    manifest = {"format": FORMAT, "source": {"sha256": sha256, "name": source.name}, "files": files,
                "safetensors_header_bytes": header}  # fmt: skip
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))


def verify(out: Path, sha256: str) -> str | None:
    """None when ``out`` is a complete conversion of the file with this sha256, else why not (a short phrase).

    Cheap: sizes and the safetensors header length, not a rehash of the weights."""
    if not out.exists():
        return "missing"
    if not out.is_dir():
        return "not a directory"
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except FileNotFoundError:
        return f"without {MANIFEST} (left by an older version or an interrupted conversion)"
    except (OSError, ValueError, RecursionError) as e:
        return f"unreadable ({MANIFEST} is not JSON: {e})"
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return f"from another converter version ({MANIFEST} format is not {FORMAT})"
    source, files = manifest.get("source"), manifest.get("files")
    if not isinstance(source, dict) or source.get("sha256") != sha256:
        return "converted from a different file (its sha256 differs)"
    if not isinstance(files, dict) or set(FILES) - set(files):
        return f"incomplete ({MANIFEST} lists no {sorted(set(FILES) - set(files or {}))})"
    for name, size in files.items():
        try:
            actual = (out / name).stat().st_size
        except OSError:
            return f"incomplete ({name} is missing)"
        if actual != size:
            return f"truncated or altered ({name} has {actual} bytes, expected {size})"
    try:
        with open(out / "model.safetensors", "rb") as f:
            (header,) = struct.unpack("<Q", f.read(8))
    except (OSError, struct.error):
        return "incomplete (model.safetensors has no header)"
    if header != manifest.get("safetensors_header_bytes"):
        return "altered (model.safetensors' header length differs from the manifest)"
    return None


def looks_converted(out: Path) -> bool:
    """Whether ``out`` holds only what a conversion writes (so it may be removed and written again)."""
    try:
        return out.is_dir() and {p.name for p in out.iterdir()} <= {*FILES, MANIFEST, "chat_template.jinja"}
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------- the directory


def writable_dir(path: Path) -> Path:
    """``path`` created if needed; a file in its place or no permission to write is one line naming it."""
    label, hint = "directory", ""
    if path == cache_root() or cache_root() in path.parents:
        env = os.environ.get("GEMMA3_JAX_CACHE")
        label = "cache directory"
        hint = f" ($GEMMA3_JAX_CACHE={env})" if env else " (set GEMMA3_JAX_CACHE to move it)"
    for p in (path, *path.parents):
        if p.exists() or p.is_symlink():
            if not p.is_dir():
                raise NotADirectoryError(f"{label} {path} cannot be used: {p} is a file, not a directory{hint}")
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise type(e)(f"{label} {path} cannot be created: {e.strerror}{hint}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise PermissionError(f"{label} {path} is not writable{hint}")
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


@contextlib.contextmanager
def try_lock(path: Path, wait: bool, note: str = "") -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``path`` while inside; yields False when ``wait`` is False and it is held."""
    if fcntl is None:
        yield True
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        if wait:
            raise
        yield False  # a read-only cache: nothing to clean up there anyway
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                yield False
                return
            if note:
                print(note, file=sys.stderr)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield True
    finally:
        os.close(fd)  # releases the lock


def remove(path: Path) -> None:
    """A directory is first renamed aside, so no reader sees it half-deleted and a kill midway leaves a leftover."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        aside = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:12]}.tmp")
        os.replace(path, aside)
        shutil.rmtree(aside)


def remove_leftovers(parent: Path, name: str | None = None, holding: str | None = None) -> list[Path]:
    """Remove temporary files and directories in ``parent`` of processes that are gone (of ``name`` only, if given).

    One whose lock another process holds is left alone, even if its pid looks dead (another pid namespace sharing
    the cache); ``holding`` names the lock this process holds itself. Returns what was removed."""
    removed = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    for p in entries:
        m = _TMP.fullmatch(p.name)
        if not m or (name is not None and m["name"] != name) or _alive(int(m["pid"])):
            continue
        lock = parent / f".{m['name']}.lock"
        with contextlib.ExitStack() as stack:
            if m["name"] != holding and lock.exists() and not stack.enter_context(try_lock(lock, wait=False)):
                continue
            with contextlib.suppress(OSError):
                remove(p)
                removed.append(p)
    return removed


def remove_legacy_leftovers(root: Path) -> None:
    """Temporary directories of older versions (no pid in the name): removed once untouched for an hour."""
    try:
        entries = [p for p in root.iterdir() if _LEGACY_TMP.fullmatch(p.name) and looks_converted(p)]
        for p in entries:
            if time.time() - max([p.stat().st_mtime] + [q.stat().st_mtime for q in p.iterdir()]) > _LEGACY_AGE_S:
                shutil.rmtree(p)
    except OSError:
        pass

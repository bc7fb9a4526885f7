"""The cache of converted .gguf checkpoints (gemma3_jax.checkpoints.store): keyed by content, built aside and renamed,
verified on use, leftovers of killed conversions removed, one writer at a time, and every bad cache directory
state answered in one line. Tiny random gemma3 GGUFs (a few kB, converted in milliseconds) stand in for models."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from gemma3_jax.checkpoints import gguf as g
from gemma3_jax.checkpoints import store as gc

ROOT = Path(__file__).parents[1]


def write_tiny_gguf(path: Path, seed: int = 0, layers: int = 2, hidden: int = 8, arch: str = "gemma3",
                    tokenizer: str = "llama", drop: str = "", extra: str = "", block_count: bool = True) -> Path:
    """A Gemma-3 GGUF with random float32 weights and a 266-token vocabulary (specials, bytes, a few pieces);
    the keywords make it wrong in one way (another architecture, a tensor dropped or added, ...)."""
    import gguf

    heads, kv, head_dim, ffn = 2, 1, 4, 16
    w = gguf.GGUFWriter(str(path), arch)
    if block_count:
        w.add_block_count(layers)
    w.add_embedding_length(hidden), w.add_head_count(heads), w.add_head_count_kv(kv)
    w.add_key_length(head_dim), w.add_value_length(head_dim), w.add_feed_forward_length(ffn)
    w.add_context_length(64), w.add_sliding_window(4), w.add_rope_freq_base(1e6), w.add_layer_norm_rms_eps(1e-6)
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", *(f"<0x{b:02X}>" for b in range(256)), "a", "b", "\u2581", "ab",
              "<start_of_turn>", "<end_of_turn>"]  # fmt: skip
    w.add_tokenizer_model(tokenizer), w.add_token_list(tokens), w.add_token_scores([0.0] * len(tokens))
    w.add_token_types([3, 3, 3, 2] + [6] * 256 + [1, 1, 1, 1, 3, 3])
    w.add_bos_token_id(2), w.add_eos_token_id(1), w.add_pad_token_id(0), w.add_unk_token_id(3)
    rng = np.random.default_rng(seed)
    w.add_tensor("token_embd.weight", rng.standard_normal((len(tokens), hidden), np.float32))
    w.add_tensor("output_norm.weight", rng.standard_normal(hidden, np.float32))
    shapes = {"attn_norm": (hidden,), "post_attention_norm": (hidden,), "ffn_norm": (hidden,), "post_ffw_norm": (hidden,),
              "attn_q": (heads * head_dim, hidden), "attn_k": (kv * head_dim, hidden), "attn_v": (kv * head_dim, hidden),
              "attn_output": (hidden, heads * head_dim), "attn_q_norm": (head_dim,), "attn_k_norm": (head_dim,),
              "ffn_gate": (ffn, hidden), "ffn_up": (ffn, hidden), "ffn_down": (hidden, ffn)}  # fmt: skip
    for i in range(layers):
        for name, shape in shapes.items():
            if f"blk.{i}.{name}.weight" != drop:
                w.add_tensor(f"blk.{i}.{name}.weight", rng.standard_normal(shape, np.float32))
    if extra:
        w.add_tensor(extra, rng.standard_normal((len(tokens), hidden), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return path


def embedding(checkpoint: Path) -> np.ndarray:
    with safe_open(str(checkpoint / "model.safetensors"), "np") as f:
        return f.get_tensor("model.embed_tokens.weight")


def source_embedding(gguf_path: Path) -> np.ndarray:
    file = g.read_gguf(gguf_path)
    return file.read(next(t for t in file.tensors if t.name == "token_embd.weight"))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("GEMMA3_JAX_CACHE", str(root))
    return root


@pytest.fixture
def conversions(monkeypatch):
    """Counts calls of the converter (still converting for real)."""
    calls, real = [], g.convert_gguf

    def counted(src, out, progress=True):
        calls.append(Path(src))
        return real(src, out, progress=progress)

    monkeypatch.setattr(g, "convert_gguf", counted)
    return calls


def entries(cache: Path) -> list[str]:
    return sorted(p.name for p in (cache / "converted").iterdir() if p.is_dir())


def test_same_content_under_two_paths_is_one_copy(cache, tmp_path, conversions):
    a = write_tiny_gguf(tmp_path / "a.gguf")
    (tmp_path / "elsewhere").mkdir()
    b = shutil.copy(a, tmp_path / "elsewhere" / "renamed.gguf")
    out = g.converted_checkpoint(a, progress=False)
    assert g.converted_checkpoint(b, progress=False) == out == g.converted_checkpoint(str(a), progress=False)
    assert len(conversions) == 1 and entries(cache) == [out.name]
    assert out == cache / "converted" / gc.file_sha256(a)[:16]
    assert gc.verify(out, gc.file_sha256(a)) is None
    np.testing.assert_array_equal(embedding(out), source_embedding(a))


def test_different_file_with_same_name_and_size_is_converted_anew(cache, tmp_path, conversions):
    path = write_tiny_gguf(tmp_path / "model.gguf", seed=0)
    first = g.converted_checkpoint(path, progress=False)
    st = path.stat()
    write_tiny_gguf(path, seed=1)  # same name, same size, even the same mtime
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns
    second = g.converted_checkpoint(path, progress=False)
    assert second != first and len(conversions) == 2 and entries(cache) == sorted([first.name, second.name])
    np.testing.assert_array_equal(embedding(second), source_embedding(path))
    assert not np.array_equal(embedding(first), embedding(second))


def test_hash_is_memoized_and_a_bad_memo_is_ignored(cache, tmp_path, monkeypatch):
    path = write_tiny_gguf(tmp_path / "m.gguf")
    out = g.converted_checkpoint(path, progress=False)
    memo = cache / "converted" / "sha256.json"
    assert json.loads(memo.read_text())[str(path.resolve())]["sha256"] == gc.file_sha256(path)
    with monkeypatch.context() as m:
        m.setattr(gc.hashlib, "sha256", lambda: pytest.fail("hashed again"))
        m.setattr(g, "convert_gguf", lambda *a, **k: pytest.fail("converted again"))
        assert g.converted_checkpoint(path, progress=False) == out
    for bad in ("{not json", "[1, 2]", json.dumps({str(path.resolve()): {"stat": [], "sha256": "0" * 64}})):
        memo.write_text(bad)  # unreadable or stale: rehashed, never trusted
        assert g.converted_checkpoint(path, progress=False) == out
    assert json.loads(memo.read_text())[str(path.resolve())]["sha256"] == gc.file_sha256(path)


def test_hash_is_of_the_file_as_opened(cache, tmp_path, monkeypatch):
    """A new file renamed over the path while it is hashed (another process assembling the packaged GGUF) leaves
    the opened one whole: its hash stands (this raised in CI). A write into the opened file is still caught."""
    import hashlib

    sha256 = hashlib.sha256  # gc.hashlib is this module: patching it patches hashlib.sha256 itself
    old, new = os.urandom(3 << 20), os.urandom(3 << 20)
    path = tmp_path / "f.gguf"

    def hashing(interfere):
        real = sha256()

        class Digest:  # interferes once, after the first 8 MiB piece (the whole file here) was read
            done = False

            def update(self, data):
                if not Digest.done:
                    Digest.done = True
                    interfere()
                real.update(data)

            def hexdigest(self):
                return real.hexdigest()

        return Digest

    def rename_over():
        (tmp_path / "new.tmp").write_bytes(new)
        os.replace(tmp_path / "new.tmp", path)

    path.write_bytes(old)
    monkeypatch.setattr(gc.hashlib, "sha256", hashing(rename_over))
    assert gc.file_sha256(path) == sha256(old).hexdigest()
    monkeypatch.setattr(gc.hashlib, "sha256", sha256)
    assert gc.file_sha256(path) == sha256(new).hexdigest()  # the memo keyed the old file, not this one

    def write_into():
        with open(path, "ab") as f:
            f.write(b"x")

    path.write_bytes(old)
    monkeypatch.setattr(gc.hashlib, "sha256", hashing(write_into))
    with pytest.raises(ValueError, match="changed while it was being read"):
        gc.file_sha256(path)


def _truncate(out):
    with open(out / "model.safetensors", "r+b") as f:
        f.truncate(f.seek(0, 2) - 100)


def _header(out):  # same size, different header length: the data offsets no longer match
    data = bytearray((out / "model.safetensors").read_bytes())
    data[0] += 8
    (out / "model.safetensors").write_bytes(bytes(data))


DAMAGE = {
    "truncated safetensors": (_truncate, "model.safetensors has"),
    "safetensors header altered": (_header, "header length differs"),
    "tokenizer.json missing": (lambda out: (out / "tokenizer.json").unlink(), "tokenizer.json is missing"),
    "manifest not JSON": (lambda out: (out / gc.MANIFEST).write_text("{\"format\": 1,"), "is not JSON"),
    "manifest a list": (lambda out: (out / gc.MANIFEST).write_text("[]"), "format is not"),
    "older converter format": (
        lambda out: (out / gc.MANIFEST).write_text(json.dumps({**json.loads((out / gc.MANIFEST).read_text()), "format": 0})),
        "from another converter version"),
    "no manifest (older version)": (lambda out: (out / gc.MANIFEST).unlink(), "without manifest.json"),
    "manifest of another file": (
        lambda out: (out / gc.MANIFEST).write_text(
            json.dumps({**json.loads((out / gc.MANIFEST).read_text()), "source": {"sha256": "0" * 64}})),
        "different file"),
    "entry is a file": (lambda out: (shutil.rmtree(out), out.write_text("x")), "not a directory"),
    "entry is empty": (lambda out: (shutil.rmtree(out), out.mkdir()), "without manifest.json"),
}  # fmt: skip


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_entry_is_rebuilt_with_a_note(cache, tmp_path, capsys, conversions, damage):
    path = write_tiny_gguf(tmp_path / "m.gguf")
    out = g.converted_checkpoint(path, progress=False)
    reference = embedding(out)
    hurt, reason = DAMAGE[damage]
    hurt(out)
    capsys.readouterr()
    assert g.converted_checkpoint(path, progress=False) == out
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(out) in err[0] and reason in err[0] and "converting" in err[0], err
    assert len(conversions) == 2 and gc.verify(out, gc.file_sha256(path)) is None
    np.testing.assert_array_equal(embedding(out), reference)
    assert [p.name for p in (cache / "converted").iterdir() if p.name.endswith(".tmp")] == []


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()  # reaped: os.kill(pid, 0) now fails
    return p.pid


def test_leftovers_of_killed_conversions_are_removed(cache, tmp_path):
    """A conversion killed mid-write leaves its temporary directory; the next resolve removes it and converts."""
    path = write_tiny_gguf(tmp_path / "m.gguf")
    code = textwrap.dedent(f"""
        import time
        from gemma3_jax.checkpoints import gguf as g
        real = g.hf_tensor
        def slow(file, t):
            time.sleep(0.5)
            return real(file, t)
        g.hf_tensor = slow
        g.converted_checkpoint({str(path)!r}, progress=False)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "GEMMA3_JAX_CACHE": str(cache)})
    try:
        deadline = time.monotonic() + 60
        while not [p for p in (cache / "converted").glob(f".*.{proc.pid}-*.tmp") if (p / "model.safetensors").exists()]:
            assert proc.poll() is None and time.monotonic() < deadline, "the conversion never started"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    (left,) = (cache / "converted").glob(f".*.{proc.pid}-*.tmp")
    key = gc.file_sha256(path)[:16]
    assert left.name.startswith(f".{key}.") and not (cache / "converted" / key).exists()
    out = g.converted_checkpoint(path, progress=False)
    assert not left.exists() and out.name == key and gc.verify(out, gc.file_sha256(path)) is None
    assert [p.name for p in (cache / "converted").iterdir() if p.name.endswith(".tmp")] == []


def test_leftovers_of_live_or_locking_processes_are_kept(cache, tmp_path):
    path = write_tiny_gguf(tmp_path / "m.gguf")
    out = g.converted_checkpoint(path, progress=False)
    conv = cache / "converted"
    live = conv / f".{out.name}.{os.getpid()}-abc.tmp"  # a conversion in progress here
    dead = conv / f".{out.name}.{_dead_pid()}-abc.tmp"
    other = conv / f".otherkey.{_dead_pid()}-abc.tmp"  # dead pid, but its lock is held (another pid namespace)
    for d in (live, dead, other):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"partial")
    with gc.try_lock(conv / ".otherkey.lock", wait=False) as held:
        assert held
        assert g.converted_checkpoint(path, progress=False) == out  # a resolve of a converted file tidies too
    assert live.exists() and other.exists() and not dead.exists()
    assert gc.remove_leftovers(conv) == [other]


def test_concurrent_conversions_have_one_writer(cache, tmp_path, monkeypatch, capfd):
    path = write_tiny_gguf(tmp_path / "m.gguf")
    gc.file_sha256(path)  # hashed once here: the threads then meet at the lock, not in the memo
    calls, real, results = [], g.convert_gguf, []

    def slow(src, out, progress=True):
        calls.append(out)
        time.sleep(1.0)
        return real(src, out, progress=progress)

    monkeypatch.setattr(g, "convert_gguf", slow)

    def resolve():
        results.append(g.converted_checkpoint(path, progress=False))

    threads = [threading.Thread(target=resolve) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(results) == 3 and len(set(results)) == 1 and len(calls) == 1
    assert "waiting for another process converting" in capfd.readouterr().err
    assert gc.verify(results[0], gc.file_sha256(path)) is None
    assert entries(cache) == [results[0].name]


def test_source_replaced_during_conversion(cache, tmp_path, monkeypatch):
    path = write_tiny_gguf(tmp_path / "m.gguf", seed=0)
    real = g.convert_gguf

    def swap_then_convert(src, out, progress=True):
        write_tiny_gguf(path, seed=1)
        return real(src, out, progress=progress)

    monkeypatch.setattr(g, "convert_gguf", swap_then_convert)
    with pytest.raises(ValueError, match=f"{path}.*changed while it was converted"):
        g.converted_checkpoint(path, progress=False)
    assert entries(cache) == []


def test_failed_conversion_leaves_nothing(tmp_path, cache, monkeypatch):
    """convert_gguf into a directory of the user's: a failure midway leaves nothing, an existing one is refused."""
    path, calls = write_tiny_gguf(tmp_path / "m.gguf"), []

    def failing(file, t):
        calls.append(t.name)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return np.zeros(t.shape, np.float32)

    (tmp_path / "parent").mkdir()
    monkeypatch.setattr(g, "hf_tensor", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        g.convert_gguf(path, tmp_path / "parent" / "out", progress=False)
    assert len(calls) == 3 and list((tmp_path / "parent").iterdir()) == []
    (tmp_path / "parent" / "out").mkdir()
    with pytest.raises(FileExistsError, match="out"):
        g.convert_gguf(path, tmp_path / "parent" / "out", progress=False)


def test_disk_full_during_conversion(cache, tmp_path, monkeypatch):
    path = write_tiny_gguf(tmp_path / "m.gguf")

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(g, "_write_safetensors", disk_full)
    with pytest.raises(OSError, match=f"No space left on device while converting {path} into {cache}"):
        g.converted_checkpoint(path, progress=False)
    assert entries(cache) == [] and [p for p in (cache / "converted").iterdir() if p.name.endswith(".tmp")] == []


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _cut(path: Path, n: int) -> Path:
    data = write_tiny_gguf(path).read_bytes()
    path.write_bytes(data[:n])
    return path


BAD_GGUF = {
    "another architecture": (lambda p: write_tiny_gguf(p, arch="llama"), "architecture is 'llama'; only 'gemma3'"),
    "no block_count": (lambda p: write_tiny_gguf(p, block_count=False), "no 'gemma3.block_count'"),
    "a tensor missing": (lambda p: write_tiny_gguf(p, drop="blk.1.ffn_up.weight"), "missing.*layers.1.mlp.up_proj"),
    "untied output.weight": (lambda p: write_tiny_gguf(p, extra="output.weight"), "'output.weight'.*untied"),
    "another tokenizer": (lambda p: write_tiny_gguf(p, tokenizer="gpt2"), "tokenizer.ggml.model is 'gpt2'"),
    "empty file": (lambda p: _write(p, b""), "is not a GGUF file \\(0 bytes\\)"),
    "only the magic": (lambda p: _write(p, b"GGUF"), "malformed GGUF header"),
    "cut in the header": (lambda p: _cut(p, 30), "malformed GGUF header"),
    "cut in the weights": (lambda p: _cut(p, 20000), "past the end of the file"),
    "a zip file": (lambda p: _write(p, b"PK\x03\x04" + bytes(100)), "is not a GGUF file"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_GGUF)
def test_bad_gguf_is_one_line_naming_it(cache, tmp_path, case):
    make, message = BAD_GGUF[case]
    path = make(tmp_path / "m.gguf")
    with pytest.raises(ValueError, match=message) as e:
        g.converted_checkpoint(path, progress=False)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    assert entries(cache) == [] and [p for p in (cache / "converted").iterdir() if p.name.endswith(".tmp")] == []


def test_bad_arguments(cache, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf does not exist"):
        g.converted_checkpoint(tmp_path / "nope.gguf")
    (tmp_path / "dir.gguf").mkdir()
    with pytest.raises(IsADirectoryError, match="dir.gguf is a directory"):
        g.converted_checkpoint(tmp_path / "dir.gguf")
    os.mkfifo(tmp_path / "pipe.gguf")
    with pytest.raises(ValueError, match="pipe.gguf is not a regular file"):
        g.converted_checkpoint(tmp_path / "pipe.gguf")
    with pytest.raises(TypeError, match="got int"):
        g.converted_checkpoint(3)


def test_cache_directory_states(tmp_path, monkeypatch):
    path = write_tiny_gguf(tmp_path / "m.gguf")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    monkeypatch.setenv("GEMMA3_JAX_CACHE", str(a_file))
    with pytest.raises(NotADirectoryError, match=f"{a_file} is a file, not a directory \\(\\$GEMMA3_JAX_CACHE={a_file}\\)"):
        g.converted_checkpoint(path, progress=False)
    monkeypatch.setenv("GEMMA3_JAX_CACHE", str(a_file / "sub"))
    with pytest.raises(NotADirectoryError, match=f"{a_file / 'sub'}/converted cannot be used: {a_file} is a file"):
        g.converted_checkpoint(path, progress=False)
    root = tmp_path / "root"
    (root / "converted").parent.mkdir()
    (root / "converted").write_text("x")
    monkeypatch.setenv("GEMMA3_JAX_CACHE", str(root))
    with pytest.raises(NotADirectoryError, match=f"{root / 'converted'} is a file"):
        g.converted_checkpoint(path, progress=False)
    assert a_file.read_text() == "x" and (root / "converted").read_text() == "x"  # nothing of the user's removed


@pytest.mark.parametrize("how", ["chmod", "os.access"])
def test_unwritable_cache_directory(tmp_path, monkeypatch, how):
    path = write_tiny_gguf(tmp_path / "m.gguf")
    root = tmp_path / "ro"
    (root / "converted").mkdir(parents=True)
    monkeypatch.setenv("GEMMA3_JAX_CACHE", str(root))
    if how == "chmod":
        (root / "converted").chmod(0o500)
        if os.access(root / "converted", os.W_OK):
            pytest.skip("running as root: a 0o500 directory is writable (the os.access case covers the check)")
    else:
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == root / "converted" else real(p, mode, **k))
    try:
        with pytest.raises(PermissionError, match=f"cache directory {root / 'converted'} is not writable \\(\\$GEMMA3_JAX_CACHE"):
            g.converted_checkpoint(path, progress=False)
    finally:
        (root / "converted").chmod(0o755)


def test_converted_entry_is_used_from_a_read_only_cache(cache, tmp_path, monkeypatch):
    path = write_tiny_gguf(tmp_path / "m.gguf")
    out = g.converted_checkpoint(path, progress=False)
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == out.parent else real(p, mode, **k))
    monkeypatch.setattr(g, "convert_gguf", lambda *a, **k: pytest.fail("converted again"))
    assert g.converted_checkpoint(path, progress=False) == out


def test_default_checkpoint_into_a_directory_of_the_users(tmp_path, monkeypatch):
    """An explicit ``cache_dir`` holding anything but a conversion is never removed (nor converted into)."""
    monkeypatch.setattr(g, "convert_gguf", lambda *a, **k: pytest.fail("converted"))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match=f"{mine} is a directory that is not a converted checkpoint"):
        g.default_checkpoint(mine, progress=False)
    (tmp_path / "file").write_text("keep")
    with pytest.raises(FileExistsError, match=f"{tmp_path / 'file'} is a file"):
        g.default_checkpoint(tmp_path / "file", progress=False)
    assert (mine / "notes.txt").read_text() == "keep" and (tmp_path / "file").read_text() == "keep"


def test_legacy_leftovers_are_removed_once_stale(cache, tmp_path):
    """Older versions named temporary directories without a pid: removed once untouched for an hour."""
    cache.mkdir()
    stale, fresh = cache / ".gemma-3-270m.k2j3h4l5", cache / ".model-12345.ab_cd012"
    for d in (stale, fresh):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"partial")
    hours_ago = time.time() - 2 * 3600
    for p in (stale / "model.safetensors", stale):
        os.utime(p, (hours_ago, hours_ago))
    g.converted_checkpoint(write_tiny_gguf(tmp_path / "m.gguf"), progress=False)
    assert not stale.exists() and fresh.exists()

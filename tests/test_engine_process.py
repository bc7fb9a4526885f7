"""The engine in a process of its own (``Service.from_pretrained(engine_process=True)``, scripts/serve.py's default):
the same tokens as the engine on a thread, its refusals raised in the caller, cancels and stats across the pipe, and
a child that dies ends its streams instead of leaving their readers waiting."""

import asyncio
import os
import signal

import numpy as np
import pytest

from fixtures import real_layout as rl
from gemma3_jax.model.pixels import PixelLevels
from gemma3_jax.runtime.engine_process import EngineExited
from gemma3_jax.runtime.service import Service

SETTINGS = dict(dtype="float32", cache_length=256, max_batch=4, chunk_tokens=32, background_compile=False,
                progress=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine_process")
    images = [str(p) for p in rl.write_images(root, seed=3)]
    return rl.write_checkpoint(root / "gemma-3-4b-it", "it"), images


def requests(images):
    """(kwargs of submit) for a chat with two images, a raw prompt and token ids, all greedy."""
    chat = [{"role": "user", "content": [{"type": "image", "image": images[0]}, {"type": "text", "text": "and"},
                                         {"type": "image", "image": images[1]}, {"type": "text", "text": "differ?"}]}]
    return [dict(messages=chat, max_new_tokens=9), dict(prompt="Once upon a time", max_new_tokens=12),
            dict(token_ids=[2, 100, 200, 300], max_new_tokens=5)]


def test_engine_process_serves_what_a_thread_serves(checkpoint):
    path, images = checkpoint
    asks = requests(images)
    with Service.from_pretrained(path, **SETTINGS) as local:
        want = [local.submit(**a, temperature=0) for a in asks]
        want = [(s.result(), s.token_ids, s.finish_reason) for s in want]
        with pytest.raises(ValueError) as refused:
            local.submit(prompt="word " * 300, max_new_tokens=8)

    exits = []
    remote = Service.from_pretrained(path, engine_process=True, **SETTINGS)
    remote.engine.on_exit = exits.append
    try:
        pid = remote.engine.process.pid
        assert pid != os.getpid() and remote.engine.alive
        streams = [remote.submit(**a, temperature=0) for a in asks]  # all at once: batched in the child
        assert [(s.result(), s.token_ids, s.finish_reason) for s in streams] == want
        assert all(s.ttft_s is not None and s.ttft_s > 0 for s in streams)

        async def read(stream):
            return "".join([d.text async for d in stream])

        assert asyncio.run(read(remote.submit(**asks[1], temperature=0))) == want[1][0]
        with pytest.raises(ValueError) as refused_there:  # the child's engine refused it; raised here
            remote.submit(prompt="word " * 300, max_new_tokens=8)
        assert str(refused_there.value) == str(refused.value)
        table = np.zeros((3, 256), np.float32)
        with pytest.raises(ValueError, match=r"pixel_values\.levels must be a uint8"):  # not uint8
            remote.submit(token_ids=[2, 100], images=PixelLevels(np.zeros((1, 3, 8, 8), np.int64), table))
        with pytest.raises(ValueError, match=r"pixel_values must be \[num_images"):  # not the model's image size
            remote.submit(token_ids=[2, 100], images=PixelLevels(np.zeros((1, 3, 8, 8), np.uint8), table))

        long = remote.submit(prompt="A long story", max_new_tokens=200, temperature=0)
        first = next(iter(long))
        long.cancel()
        assert long.result().startswith(first.text) and long.finish_reason == "cancelled"
        stats = remote.stats()
        assert stats["submitted"] >= 5 and stats["cancelled"] >= 1 and stats["model"] == path.name

        running = remote.submit(prompt="Another long story", max_new_tokens=200, temperature=0)
        next(iter(running))
        os.kill(pid, signal.SIGKILL)  # the child dies mid-stream: its reader ends, nothing waits forever
        running.result()
        assert running.finish_reason == "error" and len(running.token_ids) < 200
        remote.engine._thread.join(10)
        assert exits == [-signal.SIGKILL] and not remote.engine.alive
        with pytest.raises(EngineExited, match="exited"):
            remote.submit(prompt="hello", max_new_tokens=2)
        assert remote.engine._streams == {}  # the refused request's stream is not kept
    finally:
        remote.close()
    assert not remote.engine.process.is_alive()


def test_a_failure_in_the_engine_process_is_raised_in_the_caller(checkpoint):
    """A setting only the child can check (it needs the device) is refused with the child's message."""
    path, _ = checkpoint
    with pytest.raises(ValueError, match="tensor_parallel"):
        Service.from_pretrained(path, engine_process=True, tensor_parallel=64, **SETTINGS)


def test_a_program_that_ends_without_close_exits(checkpoint, tmp_path):
    """A script leaves a Service with the engine on a thread and one with the engine in a process, each with a
    request running, without ``close()``: it exits 0 at once. It aborted ("terminate called ...", the thread inside
    a device call while the interpreter went down), and with the engine process it never exited (multiprocessing's
    exit hook joined a child that waits for its parent)."""
    import subprocess
    import sys
    import textwrap
    import time
    from pathlib import Path

    script = tmp_path / "leave.py"
    script.write_text(textwrap.dedent(f"""
        from gemma3_jax.runtime.service import Service

        if __name__ == "__main__":  # the engine process is spawned: it imports this file again
            settings = {SETTINGS!r}
            for engine_process in (False, True):
                service = Service.from_pretrained({str(checkpoint[0])!r}, engine_process=engine_process, **settings)
                stream = service.submit(prompt="A long story", max_new_tokens=200, temperature=0)
                next(iter(stream))
            print("leaving", flush=True)
    """))
    root = Path(__file__).parents[1]
    began = time.monotonic()
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, cwd=root,
                         env=dict(os.environ, PYTHONPATH=str(root)))
    assert run.returncode == 0 and run.stdout.strip().endswith("leaving"), (run.returncode, run.stderr[-3000:])
    assert "terminate called" not in run.stderr and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert time.monotonic() - began < 500


def test_a_script_without_a_main_guard_is_told_so(checkpoint, tmp_path):
    """The engine's process runs the caller's script again (spawn): started outside ``if __name__ ==
    "__main__":``, the child printed multiprocessing's ~70-line bootstrapping traceback and the caller read only
    "exited with code 1 while starting". Now the child exits quietly and the caller's error names the guard."""
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "unguarded.py"
    script.write_text("from gemma3_jax.runtime.engine_process import EngineExited\n"
                      "from gemma3_jax.runtime.service import Service\n"
                      "try:\n"
                      f"    Service.from_pretrained({str(checkpoint[0])!r}, engine_process=True, **{SETTINGS!r})\n"
                      "except EngineExited as e:\n"
                      "    print(e)\n")
    root = Path(__file__).parents[1]
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, cwd=root,
                         env=dict(os.environ, PYTHONPATH=str(root)))
    assert run.returncode == 0, run.stderr[-3000:]
    assert 'if __name__ == "__main__":' in run.stdout, run.stdout
    assert "bootstrapping" not in run.stderr and "Traceback" not in run.stderr, run.stderr[-3000:]

"""The engine in a process of its own, so that no thread of the caller's process takes the GIL its thread needs.

A server's event loop and request threads (JSON, base64, images, detokenizing) share one GIL with the engine's
thread, and the engine's thread needs it between every two executable calls: under a burst it waited for it ~4 s
of 15 (docs/benchmarks.md). Here a child process (spawned: JAX does not survive a fork) loads the weights and runs
the ``BatchEngine``; the caller keeps the checkpoint's tokenizer, processor and chat template, builds each request
and sends it over a socket pair, its pixels as raw bytes (one copy each way, the GIL released while they move). The
child sends each request's new tokens back, all the deliveries of a moment in one message.

    service = Service.from_pretrained(model, max_batch=32, engine_process=True)  # the weights in the child

The child ignores SIGINT and SIGTERM (its parent stops it through ``close``) and exits when its parent does.
"""

from __future__ import annotations

import atexit
import dataclasses
import itertools
import multiprocessing
import os
import queue
import signal
import socket
import sys
import threading
import time

import numpy as np

from gemma3_jax.model.pixels import PixelLevels, checked_levels
from gemma3_jax.runtime.requests import EngineClosed, QueueFull, Request, TokenStream

# A thread woken by a finished device call waits for the GIL up to Python's switch interval (5 ms by default) while
# another thread holds it; the engine's process and a server's process with the engine in it use this instead.
SWITCH_INTERVAL_S = 0.0005
_ERRORS = {"ValueError": ValueError, "TypeError": TypeError, "QueueFull": QueueFull, "OSError": OSError,
           "FileNotFoundError": FileNotFoundError, "ImportError": ImportError}


_NO_MAIN_GUARD = 75  # the child's exit code when the caller's script starts an engine outside its main guard


class EngineExited(EngineClosed):
    """The engine's process is gone (it crashed, was killed or was closed): no request can be served any more."""


class RemoteEngine:
    """A ``BatchEngine`` in a child process, as ``Service`` uses one: ``submit`` (checked by the child's engine, its
    refusals raised here), ``cancel``, ``stats`` and ``close``. ``on_exit(exitcode)`` is called (on a thread of this
    class) if the child ends before ``close``."""

    def __init__(self, service_kwargs: dict, *, on_exit=None):
        if getattr(multiprocessing.current_process(), "_inheriting", False):
            # This is the engine's own process running the caller's script again (spawn imports it), so the script
            # started the engine outside ``if __name__ == "__main__":``: exit quietly with a code the caller names,
            # instead of multiprocessing's traceback here.
            raise SystemExit(_NO_MAIN_GUARD)
        ctx = multiprocessing.get_context("spawn")
        self._conn, child_conn = ctx.Pipe()
        self._sock = socket.socket(fileno=os.dup(self._conn.fileno()))  # the pixels' raw bytes
        self.process = ctx.Process(target=_child_main, args=(child_conn, service_kwargs, os.getpid()),
                                   name="gemma3-engine", daemon=True)
        self.process.start()
        child_conn.close()
        self._cond = threading.Condition()  # the streams' lock, as a BatchEngine's
        self._send_lock = threading.Lock()
        self._streams: dict[int, TokenStream] = {}  # until they finish
        self._replies: dict[int, list] = {}  # call id -> [event, reply]
        self._ids, self._calls = itertools.count(), itertools.count()
        self._closing = False
        self.alive = False
        self.on_exit = on_exit
        try:
            self._await_ready()
        except BaseException:  # Ctrl-C too: the child is stopped now, not after it has loaded and compiled
            self._kill()
            self._sock.close()
            self._conn.close()
            raise
        self.alive = True
        self._thread = threading.Thread(target=self._receive, name="gemma3-engine-replies", daemon=True)
        self._thread.start()
        # a program that ends without close(): multiprocessing's own exit hook would join the child, which ignores
        # its SIGTERM and waits for this process to go first (a hang); this hook runs before it
        atexit.register(self.close)

    def _await_ready(self) -> None:
        """Wait for the child to load and compile; its failure is raised here as the child raised it."""
        try:
            msg = self._conn.recv()
        except (EOFError, OSError):
            self.process.join(5)
            if self.process.exitcode == _NO_MAIN_GUARD:
                raise EngineExited("the engine process could not start: the script that starts it runs again in it "
                                   "(multiprocessing's spawn), so it must do so under "
                                   "`if __name__ == \"__main__\":`") from None
            raise EngineExited(f"the engine process exited with code {self.process.exitcode} while starting") from None
        if msg[0] != "ready":
            self._kill()
            if msg[1] in _ERRORS:
                raise _ERRORS[msg[1]](msg[2])
            raise EngineExited(f"the engine process failed to start: {msg[1]}: {msg[2]}")
        self.checkpoint_path, self.checkpoint_name = msg[1]

    # ---- calls ---------------------------------------------------------------------------------
    def submit(self, request: Request) -> TokenStream:
        """Queue a request in the child; its refusal (ValueError, TypeError, ``QueueFull``) is raised here, any other
        failure of the child's ``submit`` as a RuntimeError with its message (the engine goes on)."""
        if not isinstance(request, Request):
            raise TypeError(f"submit takes a Request, got {type(request).__name__}")
        pixels, meta, px = None, None, request.pixel_values
        if isinstance(px, PixelLevels):  # the uint8 levels as raw bytes, the small table with the message
            px = checked_levels(px)
            pixels = np.ascontiguousarray(px.levels)
            meta = (pixels.shape, pixels.dtype.str, np.asarray(px.table))
        elif px is not None:
            pixels = np.ascontiguousarray(px, dtype=np.float32)
            meta = (pixels.shape, pixels.dtype.str, None)
        if px is not None:
            request = dataclasses.replace(request, pixel_values=None)
        stream = TokenStream(self, next(self._ids))
        with self._cond:
            self._streams[stream.id] = stream
        ok = False
        try:
            ok, err = self._call("submit", stream.id, request, meta, payload=pixels)
        finally:
            if not ok:  # refused, or the child gone during the call (EngineExited): nothing will end this stream
                with self._cond:
                    self._streams.pop(stream.id, None)
        if not ok:
            raise _ERRORS.get(err[0], RuntimeError)(err[1])
        return stream

    def cancel(self, stream: TokenStream) -> None:
        if not stream.done and self.alive:
            try:
                self._send(("cancel", stream.id))
            except EngineExited:  # gone meanwhile: its streams end as it goes
                pass

    def stats(self) -> dict:
        """The child's ``BatchEngine.stats()``."""
        return self._call("stats")

    def close(self, timeout_s: float = 30) -> None:
        """Stop the child (requests still running end as cancelled)."""
        if self._closing:
            return
        self._closing = True
        atexit.unregister(self.close)
        if self.alive:
            try:
                self._send(("close",))
            except EngineExited:
                pass
        self.process.join(timeout_s)
        self._kill()
        self._thread.join(5)
        self._end_all("cancelled")
        self._sock.close()
        self._conn.close()

    def _kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)

    def _send(self, msg, payload: np.ndarray | None = None) -> None:
        try:
            with self._send_lock:
                self._conn.send(msg)
                if payload is not None:
                    self._sock.sendall(memoryview(payload).cast("B"))
        except (OSError, ValueError) as e:  # a closed pipe
            raise EngineExited(f"the engine process is gone ({e})") from None

    def _call(self, *msg, payload: np.ndarray | None = None):
        """Send ``msg`` and wait for the child's reply to it."""
        call, event = next(self._calls), threading.Event()
        slot = self._replies[call] = [event, None]
        if not self.alive:
            raise EngineExited(f"the engine process exited (code {self.process.exitcode})")
        self._send((msg[0], call, *msg[1:]), payload)
        event.wait()
        self._replies.pop(call, None)
        if isinstance(slot[1], EngineExited):
            raise slot[1]
        return slot[1]

    # ---- the child's messages ------------------------------------------------------------------
    def _receive(self) -> None:
        while True:
            try:
                msg = self._conn.recv()
            except (EOFError, OSError):
                break
            if msg[0] == "reply":
                slot = self._replies.get(msg[1])
                if slot is not None:
                    slot[1] = msg[2]
                    slot[0].set()
            elif msg[0] == "tokens":
                self._deliver(msg[1])
        self.alive = False
        self.process.join(5)
        gone = EngineExited(f"the engine process exited (code {self.process.exitcode})")
        for slot in list(self._replies.values()):
            slot[1] = gone
            slot[0].set()
        if not self._closing:
            self._end_all("error")
            if self.on_exit is not None:
                self.on_exit(self.process.exitcode)

    def _deliver(self, batch: list[tuple[int, list[int], str | None]]) -> None:
        """New tokens and endings, stamped as they arrive here (what a reader of this process sees)."""
        now = time.perf_counter()
        with self._cond:
            for rid, tokens, reason in batch:
                s = self._streams.get(rid)
                if s is None:
                    continue
                if tokens:
                    s.tokens.extend(tokens)
                    if s.first_token_at is None:
                        s.first_token_at = now
                    s.arrivals.append((now, len(tokens)))
                if reason is not None:
                    s.finish_reason = reason
                    del self._streams[rid]
                s._notify()
            self._cond.notify_all()

    def _end_all(self, reason: str) -> None:
        with self._cond:
            for s in self._streams.values():
                s.finish_reason = reason
                s._notify()
            self._streams.clear()
            self._cond.notify_all()


# ---- the child --------------------------------------------------------------------------------------------------
def _child_main(conn, service_kwargs: dict, parent_pid: int) -> None:
    """Load and warm up a ``Service``, say ready, then serve the parent's messages until it closes or exits."""
    for sig in (signal.SIGINT, signal.SIGTERM):  # the parent decides when this process stops
        signal.signal(sig, signal.SIG_IGN)
    threading.Thread(target=_exit_with, args=(parent_pid,), name="gemma3-parent-watch", daemon=True).start()
    from tqdm import tqdm

    # tqdm's default lock is a multiprocessing semaphore: a child stopped by the parent (Ctrl-C while it started)
    # left it behind, and the resource tracker warned of it as the parent exited
    tqdm.set_lock(threading.RLock())
    from gemma3_jax.runtime.service import Service

    try:
        service = Service.from_pretrained(**service_kwargs)
        if service_kwargs.get("verbose"):
            print("compiling the first steps ...", file=sys.stderr, flush=True)
        service.warm_up()
    except Exception as e:  # noqa: BLE001 - every failure goes to the parent, which raises it
        try:
            conn.send(("failed", type(e).__name__, str(e).splitlines()[0] if str(e) else type(e).__name__))
        except OSError:  # the parent is gone
            pass
        return
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    sock = socket.socket(fileno=os.dup(conn.fileno()))
    engine, streams, send_lock = service.engine, {}, threading.Lock()
    changed: queue.SimpleQueue = queue.SimpleQueue()  # ids of streams with news (None: stop sending)

    def send(msg) -> None:
        with send_lock:
            conn.send(msg)

    def send_tokens() -> None:
        sent: dict[int, int] = {}
        while (rid := changed.get()) is not None:
            ids = {rid}
            while True:  # everything delivered meanwhile goes in the same message
                try:
                    more = changed.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    return
                ids.add(more)
            batch = []
            for i in ids:
                s = streams.get(i)
                if s is None:
                    continue
                tokens, done = s.poll(sent.get(i, 0))
                sent[i] = sent.get(i, 0) + len(tokens)
                if tokens or done:
                    batch.append((i, tokens, s.finish_reason if done else None))
                if done:
                    streams.pop(i, None)
                    sent.pop(i, None)
            if batch:
                send(("tokens", batch))

    sender = threading.Thread(target=send_tokens, name="gemma3-engine-tokens", daemon=True)
    sender.start()
    try:
        send(("ready", (str(service.checkpoint.path), service.checkpoint.name)))
    except OSError:  # the parent stopped waiting (Ctrl-C while this process started)
        service.close()
        return
    try:
        while True:
            msg = conn.recv()
            if msg[0] == "submit":
                _, call, rid, request, meta = msg
                if meta is not None:
                    shape, dtype, table = meta
                    pixels = np.empty(shape, np.dtype(dtype))
                    view, got = memoryview(pixels).cast("B"), 0
                    while got < len(view):
                        n = sock.recv_into(view[got:])
                        if n == 0:
                            raise EOFError
                        got += n
                    request = dataclasses.replace(request, pixel_values=pixels if table is None
                                                  else PixelLevels(pixels, table))
                try:
                    stream = engine.submit(request)
                except Exception as e:  # noqa: BLE001 - a refusal, or a bug failing one request, not the engine
                    send(("reply", call, (False, (type(e).__name__, str(e)))))
                    continue
                streams[rid] = stream
                stream.listen(lambda rid=rid: changed.put(rid))
                send(("reply", call, (True, None)))
            elif msg[0] == "cancel":
                stream = streams.get(msg[1])
                if stream is not None:
                    stream.cancel()
            elif msg[0] == "stats":
                send(("reply", msg[1], engine.stats()))
            elif msg[0] == "close":
                break
    except (EOFError, OSError):  # the parent is gone
        pass
    finally:
        changed.put(None)
        service.close()


def _exit_with(parent_pid: int) -> None:
    """End this process once its parent has gone (killed before it could close us)."""
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(1)

"""Image features by content: a bounded cache keyed by SHA-256 of the pixels, so an image seen recently (a
multi-turn chat resends it) is not encoded again, with the hashing kept off a new image's path to its first token.
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import os
import threading

import jax
import numpy as np

from gemma3_jax.model.pixels import PixelLevels

_HASH_PIECE = 1 << 20  # bytes of an image hashed as one piece
_PRINT_VALUES = 1 << 12  # values of an image a fingerprint reads


class PendingKey:
    """An image's content key being hashed on the cache's threads; ``result()`` waits for it."""

    def __init__(self, head: bytes, digests: list):
        self._head, self._digests, self._key = head, digests, None

    def result(self) -> bytes:
        if self._key is None:
            parts = [d if isinstance(d, bytes) else d.result() for d in self._digests]
            self._key = hashlib.sha256(self._head + b"".join(parts)).digest()
        return self._key


class FeatureCache:
    """Image features by content hash, least recently used first out, at most ``max_bytes`` held.

    Hashing a whole 896x896 image (~5 ms on one thread) is off a new image's path to its first token: a request's
    images are hashed on the cache's threads from submission, and each also gets a fingerprint (its shape, dtype
    and 4K evenly spaced values; microseconds). Equal images have equal fingerprints, so an image whose fingerprint
    no held entry has is encoded at once and its key read after the step's call is dispatched; otherwise the key
    decides, exactly."""

    def __init__(self, max_bytes: int, hash_threads: int | None = None):
        self.max_bytes = int(max_bytes)
        self._items: collections.OrderedDict[bytes, jax.Array] = collections.OrderedDict()
        self._prints: collections.Counter[bytes] = collections.Counter()  # fingerprints of the held entries
        self._print_of: dict[bytes, bytes] = {}  # key -> its image's fingerprint
        self.nbytes = 0
        self.hits = self.encodes = 0
        self._threads = hash_threads or min(4, os.cpu_count() or 1)
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()  # submitters on several threads start the pool once

    @staticmethod
    def _content(image: np.ndarray | PixelLevels) -> tuple[bytes, np.ndarray]:
        """(what a key starts with: shape, dtype and any levels' table; the array whose bytes it covers)."""
        if isinstance(image, PixelLevels):  # the same levels under another table are another image
            array = np.ascontiguousarray(image.levels)
            table = np.ascontiguousarray(image.table, np.float32).tobytes()
        else:
            array, table = np.ascontiguousarray(image), b""
        return str((array.shape, array.dtype.str)).encode() + table, array

    def fingerprint(self, image: np.ndarray | PixelLevels) -> bytes:
        return self._fingerprint(*self._content(image))

    def key_later(self, image: np.ndarray | PixelLevels) -> PendingKey:
        """SHA-256 over the shape, dtype (and a ``PixelLevels``' table) and SHA-256 digests of 1 MiB slices of the
        bytes, the slices hashed on the cache's threads (hashlib lets go of the GIL). The key does not depend on the
        number of threads; the image must not change until the key is read."""
        return self._key_later(*self._content(image))

    def fingerprint_and_key_later(self, image: np.ndarray | PixelLevels) -> tuple[bytes, PendingKey]:
        """``fingerprint`` and ``key_later`` of one image, its content read once (a request's submit)."""
        head, array = self._content(image)
        return self._fingerprint(head, array), self._key_later(head, array)

    @staticmethod
    def _fingerprint(head: bytes, array: np.ndarray) -> bytes:
        flat = array.reshape(-1)
        sample = flat[:: max(1, flat.size // _PRINT_VALUES)]
        return hashlib.sha256(head + np.ascontiguousarray(sample).tobytes()).digest()

    def _key_later(self, head: bytes, image: np.ndarray) -> PendingKey:
        data = memoryview(image).cast("B") if image.size else memoryview(b"")
        parts = [data[i: i + _HASH_PIECE] for i in range(0, len(data), _HASH_PIECE)] or [data]
        if len(parts) > 1 and self._threads > 1:
            with self._pool_lock:  # close() on another thread waits until these are queued
                if self._pool is None:
                    self._pool = concurrent.futures.ThreadPoolExecutor(self._threads, "gemma3-image-hash")
                return PendingKey(head, [self._pool.submit(lambda p: hashlib.sha256(p).digest(), part)
                                         for part in parts])
        return PendingKey(head, [hashlib.sha256(part).digest() for part in parts])

    def key(self, image: np.ndarray | PixelLevels) -> bytes:
        return self.key_later(image).result()

    def may_hold(self, fingerprint: bytes) -> bool:
        """False: no held entry is this image (it can be encoded without its key)."""
        return fingerprint in self._prints

    def clear(self) -> None:
        """Forget every image (the counters stay); only while the engine is not stepping (idle or stopped)."""
        self._items.clear()
        self._prints.clear()
        self._print_of.clear()
        self.nbytes = 0

    def close(self) -> None:
        """Stop the hashing threads (a later key starts them again)."""
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def get(self, key: bytes) -> jax.Array | None:
        feats = self._items.get(key)
        if feats is not None:
            self._items.move_to_end(key)
            self.hits += 1
        return feats

    def put(self, key: bytes, feats: jax.Array, fingerprint: bytes) -> None:
        self.encodes += 1
        size = feats.size * feats.dtype.itemsize
        if size > self.max_bytes or key in self._items:
            return
        self._items[key] = feats
        self._prints[fingerprint] += 1
        self._print_of[key] = fingerprint
        self.nbytes += size
        while self.nbytes > self.max_bytes:
            old_key, old = self._items.popitem(last=False)
            self.nbytes -= old.size * old.dtype.itemsize
            fp = self._print_of.pop(old_key)
            self._prints[fp] -= 1
            if not self._prints[fp]:
                del self._prints[fp]

"""Tensor parallelism: a model's text decoder split over the one axis of a device mesh, with ``jax.sharding``.

Over N devices, each layer's query heads split into N equal groups, one per device, and each group gets the key
and value heads its queries read: its share of them when N divides the KV heads, else a copy of the one it reads
(N > KV heads: the model then holds N KV heads, its config says so, and the KV cache splits over them too). The
q|k|v rows are laid out group after group, so splitting that weight's first axis in N gives each device its
heads; gate|up likewise (each group's gate rows, then its up rows). The output and down products contract over
the split axis, so XLA sums their partial products across devices (one all-reduce per block half). The tied
embedding / lm_head splits over the vocabulary. Norm weights and the vision tower are replicated, the tower's work
split by image where the images divide evenly (``Kernels.images_split``). Pallas kernels
run per device under ``shard_map`` (``Kernels.mesh``) on that device's heads, which are laid out as a whole
smaller model's.

    model = tensor_parallel(load_pretrained(path), 4)   # or a Mesh with one axis
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gemma3_jax.model import kv_cache as kvc
from gemma3_jax.model import quant
from gemma3_jax.model.config import Gemma3Config, param_bytes
from gemma3_jax.model.gemma3 import Gemma3
from gemma3_jax.model.layers import params_by_path

AXIS = "tp"


def make_mesh(n: int, devices=None) -> Mesh:
    """A one-axis mesh over the first ``n`` devices (of ``devices``, default all of this process's backend)."""
    devices = jax.devices() if devices is None else list(devices)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"tensor_parallel must be an int >= 1, got {n!r}")
    if n > len(devices):
        raise ValueError(f"tensor_parallel={n} needs {n} devices, but {len(devices)} are present "
                         f"({devices[0].platform})")
    return Mesh(np.array(devices[:n]), (AXIS,))


def check_splits(cfg: Gemma3Config, n: int, quantize: str | None = None) -> None:
    """Refuse a device count the model's heads, MLP or vocabulary do not split into (nor, for a ``quantize`` mode
    with a scale per group of inputs, the groups of down's inputs)."""
    t = cfg.text
    if t.num_heads % n:
        raise ValueError(f"tensor_parallel={n} does not divide the {t.num_heads} query heads")
    if t.num_kv_heads % n and n % t.num_kv_heads:
        raise ValueError(f"tensor_parallel={n} and the {t.num_kv_heads} KV heads: one must divide the other")
    for what, size in (("MLP width", t.intermediate_size), ("vocabulary", t.vocab_size)):
        if size % n:
            raise ValueError(f"tensor_parallel={n} does not divide the {what} {size}")
    quant.check_split(quantize, {"MLP width": t.intermediate_size}, n)


def sharded_config(cfg: Gemma3Config, n: int, quantize: str | None = None) -> Gemma3Config:
    """The config the split model runs with: KV heads copied up to one per device where there are fewer."""
    check_splits(cfg, n, quantize)
    return dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, num_kv_heads=max(cfg.text.num_kv_heads, n)))


def qkv_rows(heads: int, kv_heads: int, n: int) -> np.ndarray:
    """Source rows (of q|k|v stacked: q, then k, then v) of the N groups (its queries, their keys, their values)
    the split q|k|v weight holds, in order; a KV head appears in each group whose queries read it."""
    q, k = np.arange(heads), heads + np.arange(kv_heads)
    v = k + kv_heads
    if kv_heads < n:  # each KV head copied to the groups whose queries read it
        k, v = np.repeat(k, n // kv_heads), np.repeat(v, n // kv_heads)
    split = lambda x: x.reshape(n, -1)  # noqa: E731
    return np.concatenate([split(q), split(k), split(v)], axis=1).reshape(-1)


def gate_up_rows(hidden: int, n: int) -> np.ndarray:
    """Source rows (of gate|up stacked) of the N groups (its gate rows, its up rows), in order."""
    return np.arange(2 * hidden).reshape(2, n, hidden // n).transpose(1, 0, 2).reshape(-1)


def weight_rows(cfg: Gemma3Config, name: str, n: int) -> np.ndarray | None:
    """The regrouped row order of a fused text weight (or its quantization scales) split over ``n`` devices (None:
    rows as they are)."""
    t = cfg.text
    if name.startswith("text.") and name.endswith(("attn.qkv_proj", "attn.qkv_scale")):
        return qkv_rows(t.num_heads, t.num_kv_heads, n)
    if name.startswith("text.") and name.endswith(("mlp.gate_up", "mlp.gate_up_scale")):
        return gate_up_rows(t.intermediate_size, n)
    return None


def _spec(path: str, ndim: int) -> P:
    """Where a text weight splits: q|k|v and gate|up over their rows (groups), o and down over their inputs, the
    embedding over the vocabulary; quantization scales as their weight's output channels (o's and down's are
    whole on each device), or per group of inputs (``quant.grouped``: the scale has its weight's rank) as their
    weight; the rest (norms, the vision tower) is replicated."""
    axis = None
    if path.startswith("text.layers."):
        if path.endswith(("attn.qkv_proj", "mlp.gate_up", "attn.qkv_scale", "mlp.gate_up_scale")):
            axis = 0
        elif path.endswith(("attn.o_proj", "mlp.down")) or (path.endswith(("attn.o_scale", "mlp.down_scale"))
                                                             and ndim > 1):
            axis = 1
    elif path in ("text.embed", "text.embed_scale"):
        axis = 0
    return P(*(AXIS if i == axis else None for i in range(ndim)))


def param_sharding(path: str, ndim: int, mesh: Mesh) -> NamedSharding:
    """Where the split model holds its parameter ``path`` (e.g. to draw random weights straight into place)."""
    return NamedSharding(mesh, _spec(path, ndim))


def split_model(cfg: Gemma3Config, dtype, kernels, mesh: Mesh, quantize: str | None = None) -> Gemma3:
    """An abstract (unfilled) model split over ``mesh``: fill each weight with ``shard_weight``."""
    split_cfg = sharded_config(cfg, mesh.size, quantize)
    return nnx.eval_shape(lambda: Gemma3(split_cfg, dtype, dataclasses.replace(kernels, mesh=mesh), quantize))


def shard_weight(cfg: Gemma3Config, name: str, value, mesh: Mesh) -> jax.Array:
    """One weight of the unsplit model (``name``: its path, e.g. 'text.layers.0.attn.qkv_proj') regrouped and
    placed on ``mesh`` as the split model holds it."""
    rows = weight_rows(cfg, name, mesh.size)
    if rows is not None:
        value = jnp.take(value, rows, axis=0)
    return _place(value, NamedSharding(mesh, _spec(name, value.ndim)))


def shard_from_host(cfg: Gemma3Config, name: str, pieces: list[np.ndarray], mesh: Mesh, dtype,
                    quantize: str | None = None):
    """A weight of the unsplit model given as host arrays (e.g. views of a memory-mapped file) stacked along their
    first axis (a fused weight's pieces: q, k, v or gate, up), regrouped and placed on ``mesh``: each device's
    slice is gathered from the pieces, converted to ``dtype`` and copied to it alone, so neither a device nor the
    host ever holds the whole weight in one array. ``quantize``: returns (weight, scales) quantized as
    ``quant.quantize`` does on one device (the scales from one pass over the rows first, since o's and down's
    rows are split across devices; per group of inputs, each device's slice of them)."""
    sizes = [p.shape[0] for p in pieces]
    rest = pieces[0].shape[1:]
    if any(p.shape[1:] != rest for p in pieces):
        raise ValueError(f"{name}: pieces of shapes {[p.shape for p in pieces]} do not stack along their first axis")
    rows = weight_rows(cfg, name, mesh.size)
    if rows is None:
        rows = np.arange(sum(sizes))
    starts = np.cumsum([0] + sizes)
    shape = (len(rows), *rest)
    scales = None
    if quantize is not None:
        scale_name, contract = quant.rule(name)
        # per source row, from the weight rounded to the model dtype (as one device quantizes it)
        scales = np.concatenate([quant.scales_host(p[i: i + 1024].astype(dtype), quantize, contract)
                                 for p in pieces for i in range(0, p.shape[0], 1024)])

    def shard(index) -> np.ndarray:
        want = rows[index[0]]
        out = np.empty((len(want), *(len(range(*ix.indices(d))) for ix, d in zip(index[1:], rest))), np.dtype(dtype))
        for i, piece in enumerate(pieces):
            hit = np.flatnonzero((want >= starts[i]) & (want < starts[i + 1]))
            if hit.size:  # the other axes' slices first: a view, so only this device's share is read
                out[hit] = piece[(slice(None), *index[1:])][want[hit] - starts[i]]
        if scales is None:
            return out
        if quant.grouped(quantize):  # this slice's groups: its own inputs' (check_splits keeps groups whole)
            g = quant.GROUP[quantize]
            last = range(*index[-1].indices(rest[-1]))
            s = scales[want][(slice(None), *index[1:-1], slice(last.start // g, -(-last.stop // g)))]
        else:
            s = scales[want][(slice(None), *index[1: len(shape) - contract])]  # this slice's output channels
        return quant.quantize_host_with(out, s, quantize, contract)

    sharding = NamedSharding(mesh, _spec(name, len(shape)))
    value = _from_host(shape, sharding, shard)
    if scales is None:
        return value
    scale_rows = scales[rows]  # grouped: [rows, ..., groups] already
    if not quant.grouped(quantize):
        scale_rows = scale_rows.reshape(shape[: len(shape) - contract])
    return value, _place(scale_rows, NamedSharding(mesh, _spec(scale_name, scale_rows.ndim)))


def tensor_parallel(model: Gemma3, mesh: Mesh | int) -> Gemma3:
    """``model`` split over ``mesh`` (or a mesh of the first N devices): a new model; ``model`` is unchanged."""
    mesh = make_mesh(mesh) if isinstance(mesh, int) else mesh
    if not isinstance(mesh, Mesh) or len(mesh.axis_names) != 1:
        raise ValueError(f"tensor_parallel takes a device count or a Mesh with one axis, got {mesh!r}")
    split = split_model(model.cfg, model.dtype, model.kernels, mesh, model.quantize)
    source = params_by_path(model)
    for name, node in params_by_path(split).items():
        node.set_value(shard_weight(model.cfg, name, source[name][...], mesh))
    return split


def _place(x, sharding: NamedSharding) -> jax.Array:
    """``x`` placed as ``sharding`` says. A mesh that spans several processes (``jax.distributed``) is not
    addressable from one: each device of this process gets its slice of a host copy."""
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return _from_host(host.shape, sharding, lambda index: host[index])


def _from_host(shape, sharding: NamedSharding, shard) -> jax.Array:
    """``jax.make_array_from_callback``, except that 4-bit values travel as int8 and are narrowed on the devices:
    an array made from host int4 slices gets a layout (one value a byte) that compiled steps refuse."""
    dtypes = []

    def widened(index):
        x = shard(index)
        dtypes.append(x.dtype)
        return x.astype(np.int8) if x.dtype == np.dtype(jnp.int4) else x

    value = jax.make_array_from_callback(shape, sharding, widened)
    if dtypes and dtypes[0] == np.dtype(jnp.int4):
        value = jax.jit(lambda v: v.astype(jnp.int4), out_shardings=sharding)(value)
    return value


def initialize_distributed(coordinator_address: str, num_processes: int, process_id: int) -> None:
    """Join a job of several processes (hosts), each with its local devices, so one mesh spans them all: every
    process runs the same program (``jax.distributed.initialize``). On CPUs the collectives go through gloo."""
    if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
        raise ValueError(f"num_processes must be an int >= 1, got {num_processes!r}")
    if isinstance(process_id, bool) or not isinstance(process_id, int) or not 0 <= process_id < num_processes:
        raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id!r}")
    if jax.config.jax_platforms in (None, "", "cpu") or str(jax.config.jax_platforms).startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)


def cache_sharding(mesh: Mesh) -> NamedSharding:
    """KV buffers [B, C, K, H] split over their KV heads."""
    return NamedSharding(mesh, P(None, None, AXIS, None))


def shard_cache(cache: kvc.KVCache, mesh: Mesh | None) -> kvc.KVCache:
    """``cache`` placed as a split model reads it (unchanged without a mesh)."""
    if mesh is None:
        return cache
    buf = cache_sharding(mesh)
    return kvc.KVCache(tuple(_place(k, buf) for k in cache.k), tuple(_place(v, buf) for v in cache.v),
                       _place(cache.lengths, NamedSharding(mesh, P())))


def memory_plan(cfg: Gemma3Config, dtype, n: int, batch: int, cache_length: int,
                quantize: str | None = None) -> dict[str, float]:
    """Bytes each of ``n`` devices holds: the split text weights' share (one byte each when quantized, plus their
    float32 scales, o's and down's per-channel scales whole on each device; int4's per-group scales split with their
    weights), the replicated rest (norms, the vision tower and
    projector), and the KV cache's share (KV heads counted with their copies); activations and compiled code
    come on top."""
    split_cfg = sharded_config(cfg, n, quantize) if n > 1 else cfg
    t = split_cfg.text
    d, hd = t.hidden_size, t.head_dim
    split = t.vocab_size * d + t.num_layers * ((t.num_heads + 2 * t.num_kv_heads) * hd * d + d * t.num_heads * hd
                                               + 3 * t.intermediate_size * d)
    size = jnp.dtype(dtype).itemsize
    total = param_bytes(split_cfg, dtype)
    rest = total - split * size
    mine = split * size / n
    if quant.grouped(quantize):  # one scale per group of inputs: split with its weight
        mine = split * quant.bytes_per_weight(quantize) / n
    elif quantize is not None:
        scales = t.vocab_size + t.num_layers * ((t.num_heads + 2 * t.num_kv_heads) * hd + 2 * t.intermediate_size)
        mine = split / n + 4 * (scales / n + t.num_layers * 2 * d)
    cache = kvc.cache_nbytes(t, batch, cache_length, dtype)
    return dict(weights=mine + rest, kv_cache=cache / n, total=mine + rest + cache / n)


def describe_plan(plan: dict[str, float], n: int) -> str:
    gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
    return (f"per device ({n}): weights {gib(plan['weights'])} + KV cache {gib(plan['kv_cache'])} = "
            f"{gib(plan['total'])}")

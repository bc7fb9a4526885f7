"""Random-weight models for the benchmarks (a preset's config, no checkpoint), drawn on the default device.

The model is built abstractly (``nnx.eval_shape``), then each parameter is drawn with its own key
(``fold_in(seed, i)`` in sorted path order) by one small jitted function per shape, so the host never holds
a copy. Matrices ~ N(0, 1/fan_in); Gemma RMSNorm weights (``x * (1 + w)``) and biases ~ N(0, 0.02^2);
LayerNorm scales 1 + N(0, 0.02^2): activations stay finite through 34 layers in bfloat16.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from gemma3_jax.model.config import Gemma3Config
from gemma3_jax.model.gemma3 import Gemma3
from gemma3_jax.model.kernels import Kernels


def _init_std(path: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """(mean, std) of one parameter, chosen by its name and layout."""
    leaf = path.rsplit(".", 1)[-1]
    if len(shape) == 1 or leaf.endswith("_bias") or leaf == "bias":  # vectors and [N, H] head biases
        return (1.0 if leaf == "scale" else 0.0), 0.02
    if path.startswith("text."):  # [out, in] layouts: q/k/v [N, H, D], o_proj [D, N, H], mlp [F, D] / [D, F],
        fan_in = math.prod(shape[1:]) if leaf == "o_proj" else shape[-1]  # embed [V, D] (contracted over D)
    elif leaf == "o_proj":  # vision [N, H, E]: contracts N*H
        fan_in = shape[0] * shape[1]
    elif leaf == "pos_embed":  # [P, E], added to the patch embeddings
        fan_in = shape[1]
    else:  # vision [in, ...] layouts: q/k/v [E, N, H], mlp [E, F] / [F, E], patch_embed [CPP, E], projector [E, D]
        fan_in = shape[0]
    return 0.0, 1.0 / math.sqrt(fan_in)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _draw(key, shape, dtype, mean, std):
    return (jax.random.normal(key, shape, jnp.float32) * std + mean).astype(dtype)


def random_model(cfg: Gemma3Config, dtype=jnp.bfloat16, seed: int = 0, attention: str | Kernels = "auto",
                 mesh=None) -> Gemma3:
    """A ``Gemma3`` of ``cfg`` with random weights in ``dtype`` on the default device; ``attention`` as for
    ``Gemma3`` (one of ``kernels.CHOICES`` or a ``Kernels``). ``mesh``: the model split over it
    (``model.sharding``), each weight drawn in place on its devices, so no device ever holds a whole split weight
    (a 27B on two 80 GB GPUs); its values are not those of the unsplit model's draw (speed only)."""
    dtype = jnp.dtype(dtype)
    if mesh is None:
        model = nnx.eval_shape(lambda: Gemma3(cfg, dtype, attention))
    else:
        from gemma3_jax.model.sharding import split_model

        model = split_model(cfg, dtype, Kernels.resolve(attention), mesh)
    params = {".".join(map(str, path)): node for path, node in nnx.iter_graph(model) if isinstance(node, nnx.Param)}
    root = jax.random.key(seed, impl="rbg")  # XLA RngBitGenerator: compiles faster than threefry
    for i, name in enumerate(sorted(params)):
        p = params[name]
        shape = tuple(p.get_value().shape)
        mean, std = _init_std(name, shape)
        draw = _draw if mesh is None else _sharded_draw(name, len(shape), mesh)
        value = draw(jax.random.fold_in(root, i), shape, dtype, jnp.float32(mean), jnp.float32(std))
        p.set_value(_zero_head_padding(name, value, cfg))
    return model


def _sharded_draw(name: str, ndim: int, mesh):
    from gemma3_jax.model.sharding import param_sharding

    return jax.jit(_draw.__wrapped__, static_argnums=(1, 2), out_shardings=param_sharding(name, ndim, mesh))


def _zero_head_padding(name: str, value, cfg: Gemma3Config):
    """SigLIP's q/k/v/out weights hold the head dim zero-padded (72 -> 80): keep the padding zero, as loading does."""
    if not name.startswith("vision.") or name.rsplit(".", 1)[-1] not in ("qkv_proj", "qkv_bias", "o_proj"):
        return value
    h = cfg.vision.head_dim
    if name.endswith("o_proj"):  # [N, Hp, E]
        return value.at[:, h:, :].set(0)
    return value.at[..., h:].set(0)  # [E, 3, N, Hp] / [3, N, Hp]

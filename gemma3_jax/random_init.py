"""Random-weight models for benchmarks: no checkpoint, and the weights are drawn on the default device.

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

from gemma3_jax.config import GLOBAL, SLIDING, Gemma3Config, RopeConfig, TextConfig, VisionConfig
from gemma3_jax.model import Gemma3


def gemma3_4b_config() -> Gemma3Config:
    """google/gemma-3-4b-it: text 34 layers (5 sliding : 1 global), SigLIP 27 layers at 896 px."""
    layers = 34
    text = TextConfig(
        vocab_size=262_208, hidden_size=2560, intermediate_size=10240, num_layers=layers, num_heads=8,
        num_kv_heads=4, head_dim=256, query_pre_attn_scalar=256, sliding_window=1024,
        layer_types=tuple(SLIDING if (i + 1) % 6 else GLOBAL for i in range(layers)),
        rope_global=RopeConfig(1_000_000.0, "linear", 8.0), rope_local=RopeConfig(10_000.0),
        eos_token_id=(1, 106),
    )
    vision = VisionConfig(hidden_size=1152, intermediate_size=4304, num_layers=27, num_heads=16, image_size=896,
                          patch_size=14)
    return Gemma3Config(text, vision, mm_tokens_per_image=256, image_token_id=262_144, boi_token_id=255_999,
                        eoi_token_id=256_000)


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


def random_model(cfg: Gemma3Config, dtype=jnp.bfloat16, seed: int = 0, attention: str = "auto") -> Gemma3:
    """A ``Gemma3`` of ``cfg`` with random weights in ``dtype`` on the default device."""
    dtype = jnp.dtype(dtype)
    model = nnx.eval_shape(lambda: Gemma3(cfg, dtype, attention))
    params = {".".join(map(str, path)): node for path, node in nnx.iter_graph(model) if isinstance(node, nnx.Param)}
    root = jax.random.key(seed, impl="rbg")  # XLA RngBitGenerator: compiles faster than threefry
    for i, name in enumerate(sorted(params)):
        p = params[name]
        shape = tuple(p.get_value().shape)
        mean, std = _init_std(name, shape)
        value = _draw(jax.random.fold_in(root, i), shape, dtype, jnp.float32(mean), jnp.float32(std))
        p.set_value(_zero_head_padding(name, value, cfg))
    return model


def _zero_head_padding(name: str, value, cfg: Gemma3Config):
    """SigLIP's q/k/v/out weights hold the head dim zero-padded (72 -> 80): keep the padding zero, as loading does."""
    if not name.startswith("vision.") or name.rsplit(".", 1)[-1] not in ("qkv_proj", "qkv_bias", "o_proj"):
        return value
    h = cfg.vision.head_dim
    if name.endswith("o_proj"):  # [N, Hp, E]
        return value.at[:, h:, :].set(0)
    return value.at[..., h:].set(0)  # [E, 3, N, Hp] / [3, N, Hp]

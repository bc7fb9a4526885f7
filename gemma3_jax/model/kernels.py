"""The one boundary between the model and ``pallas_kernels``: which implementation runs each op, chosen once.

``Kernels`` is resolved when a model is built and held, frozen, by the modules that call an op, so the model's
call signatures do not carry the choice and nothing below reads the backend again. No other module of gemma3_jax
imports ``pallas_kernels``. Two implementations per op:

- "pallas": the Pallas kernels, compiled on a GPU and run in interpret mode elsewhere (how the tests run them);
- "reference": the pure-jnp oracles of ``pallas_kernels.reference``, compiled by XLA.

The ``attention`` argument of ``Gemma3``, ``load_pretrained`` and ``Generator`` is one of ``CHOICES`` or a
``Kernels``. "auto" is "pallas" on a GPU; on any other backend prompts keep the (interpreted) kernels and decode
runs the reference, because interpreted decode kernels make a CPU's decode several times slower.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float, Int

from gemma3_jax.model import quant
from pallas_kernels.attention import image_span_attention, packed_self_attention
from pallas_kernels.attention import padded_head_dim as _padded_head_dim
from pallas_kernels.decode_attention import decode_attention
from pallas_kernels.decode_fused import decode_attention_fused, supports_head_dim
from pallas_kernels.gemv import gemv, gemv_geglu
from pallas_kernels.gemv_int4 import gemv4, gemv4_geglu, words
from pallas_kernels.reference import decode_attention_reference, reference_attention
from pallas_kernels.residual_norm import residual_norm
from pallas_kernels.segments import segment_ids_from_image_mask
from pallas_kernels.tuning import gemv_int4_configs, gemv_mlp_configs, gemv_qkv_config

IMPLEMENTATIONS = ("pallas", "reference")
CHOICES = ("auto", *IMPLEMENTATIONS)


def platform() -> str:
    """The backend JAX runs on here ("cpu", "gpu", ...): read in this module only."""
    return jax.default_backend()


def padded_head_dim(head_dim: int) -> int:
    """The head dim the vision weights are stored with (a multiple of 16, the kernels' column chunks)."""
    return _padded_head_dim(head_dim)


class AttentionBatch(NamedTuple):
    """What attention over a prompt needs besides q, k and v, per row and O(L): a pytree, so a serving engine can
    pass one per request or chunk."""

    positions: Int[Array, "B L"]  # RoPE positions of the queries
    segment_ids: Int[Array, "B L"]  # >= 0: the image span a token belongs to (bidirectional within it); -1: text
    kv_lengths: Int[Array, "B"] | None  # keys at or past a row's length are never attended; None: all held
    # A prompt chunk after its earlier chunks' keys: query t of row b is key q_offset[b] + t (None: the last L
    # keys), and keys before kv_start[b] are never attended (None: from 0).
    q_offset: Int[Array, "B"] | None = None
    kv_start: Int[Array, "B"] | None = None

    @classmethod
    def for_prompt(cls, image_mask: Int[Array, "B L"], kv_lengths: Int[Array, "B"] | None = None) -> AttentionBatch:
        """Prompts that start at position 0, images where ``image_mask`` is set (one span per run of image tokens)."""
        b, length = image_mask.shape
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
        return cls(positions, segment_ids_from_image_mask(image_mask), kv_lengths)


@dataclasses.dataclass(frozen=True)
class Kernels:
    """The implementation of each op (``IMPLEMENTATIONS``), and how Pallas kernels run here.

    ``prefill``: attention over a prompt (text and vision). ``decode``: a decode step's attention over the cache,
    its residual adds with their norms and, at batch 1, its matrix-vector products. ``fuse_decode``: with
    "pallas" decode, q/k norms, RoPE, the cache write and the attention as one kernel where the head dim allows
    (off: XLA does the first three, the decode attention kernel the last). ``mesh``: tensor parallelism over its
    one axis (``model.sharding``): each op runs per device under ``shard_map`` on that device's heads."""

    prefill: str = "pallas"
    decode: str = "pallas"
    interpret: bool = False
    fuse_decode: bool = True
    platform: str = "gpu"
    mesh: Mesh | None = None

    def __post_init__(self):
        for name in ("prefill", "decode"):
            value = getattr(self, name)
            if value not in IMPLEMENTATIONS:
                raise ValueError(f"Kernels.{name} must be one of {', '.join(IMPLEMENTATIONS)}, got {value!r}")

    @property
    def shards(self) -> int:
        """Devices the heads are split over (1 without a mesh)."""
        return 1 if self.mesh is None else self.mesh.size

    def _per_shard(self, fn, in_specs, out_specs):
        """``fn`` on each device's part (``in_specs``/``out_specs`` name where the mesh axis splits each array; the
        rest is replicated), or ``fn`` itself without a mesh."""
        if self.mesh is None:
            return fn
        return jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)

    def images_split(self, images: int) -> bool:
        """Whether the vision tower runs image-parallel: under a mesh, each device encoding its share of the images
        with the whole (replicated) tower, when the images divide evenly. No collective runs inside the tower,
        where splitting its heads would need two all-reduces a layer; fewer images than devices run whole on each."""
        return self.mesh is not None and images % self.mesh.size == 0

    def split_images(self, x: Float[Array, "I ..."]) -> Float[Array, "I ..."]:
        """``x`` (images first) laid out over the mesh by image where ``images_split`` holds; else as it is."""
        if not self.images_split(x.shape[0]):
            return x
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, self._heads(0, x.ndim)))

    def _heads(self, axis: int, ndim: int) -> P:
        """The spec of an array split over the mesh axis at ``axis`` (a heads axis)."""
        return P(*(self.mesh.axis_names[0] if i == axis else None for i in range(ndim)))

    @classmethod
    def resolve(cls, attention: str | Kernels = "auto") -> Kernels:
        """A ``Kernels`` for this backend from one of ``CHOICES`` (a ``Kernels`` is returned as it is)."""
        if isinstance(attention, Kernels):
            return attention
        if not isinstance(attention, str) or attention not in CHOICES:
            raise ValueError(f"attention must be one of {', '.join(CHOICES)}, got {attention!r}")
        here = platform()
        gpu = here == "gpu"
        decode = ("pallas" if gpu else "reference") if attention == "auto" else attention
        prefill = "pallas" if attention == "auto" else attention
        return cls(prefill=prefill, decode=decode, interpret=not gpu, platform=here)

    # ---- attention over a prompt ---------------------------------------------------------------
    def attention(
        self,
        q: Float[Array, "B L N H"],
        k: Float[Array, "B L K H"],
        v: Float[Array, "B L K H"],
        batch: AttentionBatch,
        *,
        sliding_window: int | None,
        scale: float,
    ) -> Float[Array, "B L N H"]:
        """Causal attention with the image-span mask (the mask rule of ``pallas_kernels.reference``)."""

        def run(q, k, v, batch):
            kw = dict(sliding_window=sliding_window, kv_lengths=batch.kv_lengths, scale=scale,
                      q_offset=batch.q_offset, kv_start=batch.kv_start)
            if self.prefill == "reference":
                return reference_attention(q, k, v, batch.segment_ids, **kw)
            return image_span_attention(q, k, v, batch.segment_ids, interpret=self.interpret, **kw)

        heads = None if self.mesh is None else self._heads(2, 4)
        return self._per_shard(run, (heads, heads, heads, P()), heads)(q, k, v, batch)

    def ones_column(self, head_dim: int, padded: int) -> bool:
        """Whether vision attention wants v's first padded column set to 1 (the kernel reads its softmax
        denominator there): only the Pallas kernel, and only when the head dim is padded."""
        return self.prefill == "pallas" and padded > head_dim

    def vision_attention(self, qkv: Float[Array, "I P 3 N Hp"], *, head_dim: int, scale: float,
                         ones_column: bool) -> Float[Array, "I P N Hp"]:
        """Unmasked self-attention over each image's patches, q|k|v packed with the head dim padded to Hp; the
        output keeps the padded columns (zeros past the head dim in the reference). Under tensor parallelism each
        device runs its images (``images_split``), or all of them."""

        def run(qkv):
            if self.prefill == "reference":
                q, k, v = (qkv[:, :, i, :, :head_dim] for i in range(3))
                out = reference_attention(q, k, v, None, scale=scale, causal=False)
                return jnp.pad(out, ((0, 0), (0, 0), (0, 0), (0, qkv.shape[-1] - head_dim)))
            return packed_self_attention(qkv, head_dim=head_dim, scale=scale, interpret=self.interpret,
                                         ones_column=ones_column)

        spec = P(self.mesh.axis_names[0]) if self.images_split(qkv.shape[0]) else P()  # by image, or whole
        return self._per_shard(run, spec, spec)(qkv)

    # ---- a decode step -------------------------------------------------------------------------
    def fused_step(self, head_dim: int) -> bool:
        """Whether a layer's decode step runs ``decode_step_attention`` (else XLA's norms, RoPE and cache write,
        then ``cached_attention``)."""
        return self.decode == "pallas" and self.fuse_decode and supports_head_dim(head_dim)

    def gemv(self, batch: int, hidden: int, intermediate: int) -> bool:
        """Whether a decode step's q|k|v and MLP products run as the Pallas matrix-vector kernels: batch 1 only
        (larger batches are matrix products, XLA's), and widths the kernels split in 16-wide pieces; not under
        tensor parallelism (XLA splits the products there)."""
        return self.decode == "pallas" and self.mesh is None and batch == 1 and hidden % 16 == 0 and intermediate % 16 == 0

    def qkv_product(self, x: Float[Array, "B D"], w: Float[Array, "M D"], gemv_b1: bool,
                    scale: Float[Array, "M"] | None = None) -> Float[Array, "B M"]:
        """x @ w^T (``scale``: w quantized per row, ``model.quant``)."""
        if not gemv_b1:
            return quant.einsum("BD,MD->BM", x, w, scale)
        if w.dtype == jnp.int4:  # a scale per group of inputs
            return self._gemv4(x, w, scale, gemv_int4_configs(x.shape[1]).qkv)
        g = gemv_qkv_config(w.dtype.itemsize)
        return gemv(x, w, scale, block_n=g.block_n, splits=g.splits, num_warps=g.num_warps, interpret=self.interpret)

    def logits_product(self, x: Float[Array, "R D"], w, scale) -> Float[Array, "R V"]:
        """x @ w^T for the lm_head (``scale``: w quantized). One row over 4-bit weights runs ``gemv_int4``: XLA's
        product would dequantize the whole table first."""
        if w.dtype == jnp.int4 and x.shape[0] == 1 and self.decode == "pallas" and self.mesh is None:
            return self._gemv4(x, w, scale, gemv_int4_configs(x.shape[1]).lm_head)
        return quant.einsum("RD,VD->RV", x, w, scale)

    def _gemv4(self, x, w, scale, cfg):
        """x @ w^T over an int4 w [N, K] with its scale per 32 inputs, through ``gemv_int4`` with ``cfg``."""
        return gemv4(x, words(w), scale, block_n=cfg.block_n, splits=cfg.splits, num_warps=cfg.num_warps,
                     interpret=self.interpret)

    def decode_step_attention(self, qkv, q_norm, k_norm, eps, cos, sin, k_buf, v_buf, pos, *, ring: bool,
                              scale: float):
        """q/k RMSNorm + RoPE, the cache write and attention in one kernel: qkv [B, N + 2K, H] raw projections,
        cos/sin [B, H] -> (out [B, N, H], k_buf, v_buf). Only where ``fused_step`` holds. Under tensor parallelism
        each device's part of ``qkv`` is its group of heads, laid out as a whole model's (``model.sharding``)."""

        def run(qkv, q_norm, k_norm, cos, sin, k_buf, v_buf, pos):
            return decode_attention_fused(qkv, q_norm, k_norm, cos, sin, k_buf, v_buf, pos, ring=ring, scale=scale,
                                          eps=eps, interpret=self.interpret)

        if self.mesh is None:
            return run(qkv, q_norm, k_norm, cos, sin, k_buf, v_buf, pos)
        heads, buf = self._heads(1, 3), self._heads(2, 4)
        return self._per_shard(run, (heads, P(), P(), P(), P(), buf, buf, P()), (heads, buf, buf))(
            qkv, q_norm, k_norm, cos, sin, k_buf, v_buf, pos)

    def cached_attention(self, q: Float[Array, "B N H"], k_buf, v_buf, pos: Int[Array, "B"], *,
                         scale: float) -> Float[Array, "B N H"]:
        """One query per row over its cache after the token at ``pos`` was written. No slot order is needed: a
        buffer of S slots holds exactly the slots s < min(pos + 1, S), ring (sliding layers) or not."""
        lengths = jnp.minimum(pos + 1, k_buf.shape[1])

        def run(q, k_buf, v_buf, lengths):
            if self.decode == "reference":
                return decode_attention_reference(q, k_buf, v_buf, lengths, scale=scale)
            return decode_attention(q, k_buf, v_buf, lengths, scale=scale, interpret=self.interpret)

        if self.mesh is None:
            return run(q, k_buf, v_buf, lengths)
        heads, buf = self._heads(1, 3), self._heads(2, 4)
        return self._per_shard(run, (heads, buf, buf, P()), heads)(q, k_buf, v_buf, lengths)

    def decode_mlp(self, mlp, x: Float[Array, "B 1 D"], gemv_b1: bool):
        """The MLP of a decode step: ``mlp(x)`` [B, 1, D], or at batch 1 through the matrix-vector kernels (gate|up
        with GELU·up as its epilogue, down split over K) as float32 partial sums [S, 1, 1, D] that
        ``residual_norm`` adds, saving XLA's GELU·up and split-K reduction passes."""
        if not gemv_b1:
            return mlp(x)
        d, f = mlp.down.shape
        scales = [None if s is None else s[...] for s in (mlp.gate_up_scale, mlp.down_scale)]
        if mlp.gate_up[...].dtype == jnp.int4:  # a scale per group of inputs
            cfg = gemv_int4_configs(f)
            h = gemv4_geglu(x[:, 0], words(mlp.gate_up[...]), scales[0], block_n=cfg.gate_up.block_n,
                            num_warps=cfg.gate_up.num_warps, interpret=self.interpret)
            return self._gemv4(h, mlp.down[...], scales[1], cfg.down)[:, :, None]
        up, down = gemv_mlp_configs(d, f, mlp.gate_up[...].dtype.itemsize)
        h = gemv_geglu(x[:, 0], mlp.gate_up[...], scales[0], block_n=up.block_n, num_warps=up.num_warps,
                       interpret=self.interpret)
        out = gemv(h, mlp.down[...], scales[1], block_n=down.block_n, splits=down.splits, num_warps=down.num_warps,
                   interpret=self.interpret)
        return out[:, :, None]

    def residual_norm(self, x, delta, post, following):
        """(x + post(delta), following(x + post(delta))) for RMSNorm modules ``post`` and ``following``: one
        kernel with "pallas" decode (``delta`` may be ``decode_mlp``'s partial sums)."""
        if self.decode == "reference":
            x = x + post(delta)
            return x, following(x)

        def run(x, delta, post_w, following_w):  # on replicated activations: each device runs it whole
            return residual_norm(x, delta, post_w, following_w, eps=post.eps, interpret=self.interpret)

        return self._per_shard(run, (P(), P(), P(), P()), (P(), P()))(x, delta, post.weight[...],
                                                                      following.weight[...])


def with_kernels(module: nnx.Module, attention: str | Kernels) -> nnx.Module:
    """A copy of ``module`` that shares its weights and runs ``attention``'s kernels (to compare implementations
    on one set of weights)."""
    kernels = Kernels.resolve(attention)
    graphdef, state = nnx.split(module)
    copy = nnx.merge(graphdef, state)
    for _, m in nnx.iter_modules(copy):
        if hasattr(m, "kernels"):
            m.kernels = kernels
    return copy

"""Attention (multi-head or grouped-query): causal or bidirectional, self or cross, with a choice of kernel.

Every kernel takes (q_BTNH, k_BSKH, v_BSKH, q_segment_ids_BT, kv_segment_ids_BS, q_start) and the
keywords `causal`, `bias_BNTS` and `scale`, and returns [B, T, N, H]. Segment ids number the
packed documents of a row (None: one document per row); a query attends only to keys of its own
segment (in cross-attention, the encoder's segment of the same number). q_start is where the
queries sit in the keys when decoding into a KV cache (None: training, queries and keys are the
same positions). `causal` lets a query see only keys at or before its own index (decoders);
bidirectional attention (encoders, cross-attention) sees its whole segment. `bias_BNTS` is added
to the scores (T5's relative positions); `scale` multiplies them (None: head_dim ** -0.5).

Shape letters: B batch, T query length, S key length, N query heads, K key/value heads,
G = N // K query heads per key/value head, H head dim, D embed dim, M documents per row.
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import NamedSharding, PartitionSpec as P

from lm.models import layers


def attention_mask(
    q_segment_ids_BT: jax.Array, kv_segment_ids_BS: jax.Array, q_start: jax.Array | int = 0, causal: bool = True
) -> jax.Array:
  """[B, T, S] True where query t may attend to key s: same packed document, and (when causal) s <= the
  query's index.

  Query t sits at sequence index q_start + t (q_start > 0 when decoding into a KV cache).
  """
  same_document_BTS = q_segment_ids_BT[:, :, None] == kv_segment_ids_BS[:, None, :]
  if not causal:
    return same_document_BTS
  q_index_T1 = q_start + jnp.arange(q_segment_ids_BT.shape[1])[:, None]
  causal_TS = jnp.arange(kv_segment_ids_BS.shape[1])[None, :] <= q_index_T1
  return causal_TS[None] & same_document_BTS


def xla_attention(
    q_BTNH, k_BSKH, v_BSKH, q_segment_ids_BT, kv_segment_ids_BS, q_start=None, *, causal=True, bias_BNTS=None, scale=None
) -> jax.Array:
  """Plain einsum attention; softmax in float32. Returns [B, T, N, H]."""
  batch, length, num_heads, head_dim = q_BTNH.shape
  if q_segment_ids_BT is None:  # one document per row
    q_segment_ids_BT, kv_segment_ids_BS = jnp.ones((batch, length), jnp.int32), jnp.ones(k_BSKH.shape[:2], jnp.int32)
  num_kv_heads, kv_length = k_BSKH.shape[2], k_BSKH.shape[1]
  q_BTKGH = q_BTNH.reshape(batch, length, num_kv_heads, num_heads // num_kv_heads, head_dim)
  scores_BKGTS = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH, preferred_element_type=jnp.float32)
  scores_BKGTS = scores_BKGTS * (head_dim**-0.5 if scale is None else scale)
  if bias_BNTS is not None:
    bias_BKGTS = bias_BNTS.astype(jnp.float32).reshape(bias_BNTS.shape[0], num_kv_heads, -1, length, kv_length)
    scores_BKGTS = scores_BKGTS + bias_BKGTS
  mask_B11TS = attention_mask(q_segment_ids_BT, kv_segment_ids_BS, 0 if q_start is None else q_start, causal)[:, None, None]
  # A fully masked query (padding, in cross-attention) gets uniform weights from the finite fill, never NaN;
  # nothing reads its output.
  scores_BKGTS = jnp.where(mask_B11TS, scores_BKGTS, jnp.finfo(jnp.float32).min)
  probs_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1).astype(v_BSKH.dtype)
  out_BTKGH = jnp.einsum("bkgts,bskh->btkgh", probs_BKGTS, v_BSKH)
  return out_BTKGH.reshape(batch, length, num_heads, head_dim)


def current_platform() -> str:
  """The platform being compiled for: that of the active mesh's devices (so compiling ahead of time for a
  TPU topology on a CPU host says "tpu"), else of the default backend."""
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and mesh.abstract_device is not None:
    return mesh.abstract_device.platform
  return jax.devices()[0].platform


def dot_product_attention(
    q_BTNH, k_BSKH, v_BSKH, q_segment_ids_BT, kv_segment_ids_BS, q_start=None, implementation=None, *,
    causal=True, bias_BNTS=None, scale=None,
) -> jax.Array:
  """jax.nn.dot_product_attention with the given implementation (None: jax chooses; jax 0.10 chooses XLA). Returns [B, T, N, H].

  Segment ids of None mean one document per row: causal masking alone (or none), no mask array.
  """
  options = dict(bias=bias_BNTS, scale=scale, implementation=implementation)
  if q_start is None and q_segment_ids_BT is None:
    return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, is_causal=causal, **options)
  if q_start is None:  # training: the kernel's own causal masking, which lets it skip masked blocks
    mask_B1TS = (q_segment_ids_BT[:, :, None] == kv_segment_ids_BS[:, None, :])[:, None]
  else:
    mask_B1TS, causal = attention_mask(q_segment_ids_BT, kv_segment_ids_BS, q_start, causal)[:, None], False
  return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=mask_B1TS, is_causal=causal, **options)


def packed_segments(segment_ids_BT: jax.Array, max_documents: int) -> tuple[jax.Array, jax.Array]:
  """Packed documents as cuDNN takes them: (lengths [B, M], offsets [B, M + 1]), M = max_documents.

  Document m of a row starts at offsets[b, m] and is lengths[b, m] tokens long; unused entries are
  -1. A row with more than M documents has its last ones joined into its M-th, which then attend
  to each other as in an unpacked row.
  """
  batch, length = segment_ids_BT.shape
  starts_BT = jnp.concatenate(
      [jnp.ones((batch, 1), bool), segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], axis=1
  )
  document_BT = jnp.minimum(jnp.cumsum(starts_BT, axis=1) - 1, max_documents - 1)  # 0-based, capped
  one_hot_BTM = document_BT[:, :, None] == jnp.arange(max_documents)
  lengths_BM = jnp.sum(one_hot_BTM, axis=1, dtype=jnp.int32)
  used_BM = lengths_BM > 0
  starts_BM = jnp.cumsum(lengths_BM, axis=1, dtype=jnp.int32) - lengths_BM
  lengths_BM = jnp.where(used_BM, lengths_BM, -1)
  offsets_BM = jnp.where(used_BM, starts_BM, -1)
  offsets_BM1 = jnp.concatenate([offsets_BM, jnp.full((batch, 1), -1, jnp.int32)], axis=1)
  return lengths_BM, offsets_BM1


@functools.cache
def _jax_places_packed_keys_by_their_own_heads() -> bool:
  """Whether jax converts packed documents' key offsets into element offsets with the keys' head count.

  jax 0.10 uses the queries' head count for both, which puts the keys of grouped-query attention
  in the wrong place; asked of jax's own conversion, on a query of 2 heads and a key of 1.
  """
  from jax._src.cudnn import fused_attention_stablehlo as cudnn

  lengths_BM = np.array([[1, 1]], np.int32)
  offsets_BM1 = np.array([[0, 1, -1]], np.int32)
  with jax.ensure_compile_time_eval():
    _, _, _, kv_offsets = cudnn._fix_seqlen_offsets(
        lengths_BM, lengths_BM, offsets_BM1, offsets_BM1, np.zeros((1, 2, 2, 1)), np.zeros((1, 2, 1, 1))
    )
  return int(np.asarray(kv_offsets).ravel()[1]) == 1  # document 2 starts at element 1 of the 1-head key


def _cudnn_packed_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, max_documents: int, causal: bool = True, scale=None) -> jax.Array:
  """cuDNN's fused attention over packed documents, given as lengths and offsets rather than a [B, T, S] mask."""
  from jax._src.cudnn import fused_attention_stablehlo as cudnn  # jax's public API takes only one length per row

  num_heads, num_kv_heads = q_BTNH.shape[2], k_BSKH.shape[2]
  if num_kv_heads != num_heads and not _jax_places_packed_keys_by_their_own_heads():
    # Give every query head its own key and value head, so both have the same head count.
    k_BSKH, v_BSKH = (jnp.repeat(x, num_heads // num_kv_heads, axis=2) for x in (k_BSKH, v_BSKH))
  lengths_BM, offsets_BM1 = packed_segments(segment_ids_BT, max_documents)
  return cudnn.dot_product_attention(
      q_BTNH, k_BSKH, v_BSKH, q_seqlen=lengths_BM, kv_seqlen=lengths_BM, q_offsets=offsets_BM1, kv_offsets=offsets_BM1,
      scale=q_BTNH.shape[-1] ** -0.5 if scale is None else scale,
      mask_type=cudnn.MaskType.PADDING_CAUSAL if causal else cudnn.MaskType.PADDING,
  )  # fmt: skip


def cudnn_attention(
    q_BTNH, k_BSKH, v_BSKH, q_segment_ids_BT, kv_segment_ids_BS, q_start=None, max_documents: int = 32, *,
    causal=True, bias_BNTS=None, scale=None,
) -> jax.Array:
  """cuDNN's fused attention, asked for explicitly; where cuDNN cannot run it (no NVIDIA GPU, or a
  shape or dtype it does not take), the XLA implementation of the same function, with one warning.

  Training on packed rows passes cuDNN each document's offset and length (up to `max_documents`
  per row), never a dense mask; decoding into a KV cache, cross-attention and a score bias pass the
  [B, T, S] mask.
  """
  args = (q_BTNH, k_BSKH, v_BSKH, q_segment_ids_BT, kv_segment_ids_BS, q_start)
  options = dict(causal=causal, bias_BNTS=bias_BNTS, scale=scale)
  if current_platform() == "gpu":
    try:
      self_attention = q_segment_ids_BT is kv_segment_ids_BS
      if q_start is None and q_segment_ids_BT is not None and self_attention and bias_BNTS is None:
        return _cudnn_packed_attention(q_BTNH, k_BSKH, v_BSKH, q_segment_ids_BT, max_documents, causal, scale)
      return dot_product_attention(*args, implementation="cudnn", **options)
    except (ValueError, NotImplementedError, RuntimeError) as error:  # raised while tracing: nothing ran yet
      logging.log_first_n(logging.WARNING, f"cuDNN attention is not available here ({error}); using the XLA implementation", 1)
  else:
    logging.log_first_n(logging.WARNING, "model.attention=cudnn needs an NVIDIA GPU; using the XLA implementation", 1)
  return dot_product_attention(*args, implementation="xla", **options)


def _splash_block(length: int) -> int | None:
  """The kernel's tile along a sequence of `length`: the largest of 512, 256, 128 that divides it, if any
  (the kernel works on whole 128-lane vectors, interpreted or not)."""
  for block in (512, 256, 128):
    if length % block == 0:
      return block
  return None


def _splash_kernel(q_length, kv_length, num_heads, head_shards, q_shards, block_q, block_kv, interpret, causal):
  """A splash attention kernel for causal (or no) masking on [N, T, H] inputs, its mask split into shards."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

  shape = (q_length, kv_length)
  mask = splash_mask.MultiHeadMask([splash_mask.CausalMask(shape) if causal else splash_mask.FullMask(shape)] * num_heads)
  blocks = splash.BlockSizes(
      block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
      block_q_dkv=block_q, block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv,
      block_q_dq=block_q, block_kv_dq=block_kv,
  )  # fmt: skip
  # Built anew in each trace: its block tables become constants of the trace that asks.
  return splash.make_splash_mha(mask, block_sizes=blocks, head_shards=head_shards, q_seq_shards=q_shards, interpret=interpret)


def _mesh_axes(logical_name: str | None) -> tuple[str, ...]:
  """The mesh axes the current rules map a logical activation axis to."""
  if logical_name is None:
    return ()
  (axes,) = nn.logical_to_mesh_axes((logical_name,))
  return (axes,) if isinstance(axes, str) else tuple(axes or ())


def splash_attention(
    q_BTNH, k_BSKH, v_BSKH, q_segment_ids_BT, kv_segment_ids_BS, q_start=None, *, causal=True, bias_BNTS=None, scale=None
) -> jax.Array:
  """Pallas splash attention (jax.experimental.pallas.ops.tpu), causal or bidirectional within packed documents.

  On a TPU it runs as a Mosaic kernel, elsewhere interpreted (slowly: for tests). Over a mesh, each
  device runs it on its rows, heads and query positions (shard_map), with the keys gathered along
  the sequence axis. Decoding into a KV cache, a score bias (which the kernel does not take), and
  lengths a TPU cannot tile use XLA.
  """
  interpret = current_platform() != "tpu"
  batch, length, num_heads, head_dim = q_BTNH.shape
  mesh = jax.sharding.get_abstract_mesh()
  batch_axes, length_axes, heads_axes = (
      _mesh_axes(name) if not mesh.empty else () for name in ("activation_batch", "activation_length", "activation_heads")
  )
  head_shards = math.prod(mesh.shape[axis] for axis in heads_axes)
  q_shards = math.prod(mesh.shape[axis] for axis in length_axes)
  kv_length = k_BSKH.shape[1]
  block_q, block_kv = _splash_block(length // q_shards), _splash_block(kv_length)
  if q_start is not None or bias_BNTS is not None or block_q is None or block_kv is None:
    if bias_BNTS is not None:
      logging.log_first_n(logging.WARNING, "splash attention takes no score bias (T5's relative positions); using XLA", 1)
    elif q_start is None:
      lengths = f"{length // q_shards} queries and {kv_length} keys"
      logging.log_first_n(logging.WARNING, f"splash attention needs whole 128-token tiles per device, not {lengths}; using XLA", 1)
    options = dict(causal=causal, bias_BNTS=bias_BNTS, scale=scale)
    return xla_attention(q_BTNH, k_BSKH, v_BSKH, q_segment_ids_BT, kv_segment_ids_BS, q_start, **options)
  if q_segment_ids_BT is None:  # one document per row
    q_segment_ids_BT, kv_segment_ids_BS = jnp.ones((batch, length), jnp.int32), jnp.ones((batch, kv_length), jnp.int32)

  # A bidirectional mask is the same for every shard of the queries, so its kernel is built for one device's
  # queries and its mask tables go whole to every query shard. (Split along the queries, jax 0.10 fails on a
  # mask with no partial blocks: it finds no mask_next tables to join.)
  kernel_q_length, kernel_q_shards = (length, q_shards) if causal else (length // q_shards, 1)
  kernel = _splash_kernel(
      kernel_q_length, kv_length, num_heads, head_shards, kernel_q_shards, block_q, block_kv, interpret, causal
  )

  def per_device(q_BTNH, k_BSKH, v_BSKH, q_segment_ids_BT, kv_segment_ids_BS, kernel):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash

    # The kernel takes one row of [heads, length, head_dim]: map it over the rows.
    q_BNTH, k_BKSH, v_BKSH = (jnp.swapaxes(x, 1, 2) for x in (q_BTNH, k_BSKH, v_BSKH))
    segment_ids = splash.SegmentIds(q=q_segment_ids_BT, kv=kv_segment_ids_BS)
    out_BNTH = jax.vmap(kernel)(q_BNTH * (head_dim**-0.5 if scale is None else scale), k_BKSH, v_BKSH, segment_ids=segment_ids)
    return jnp.swapaxes(out_BNTH, 1, 2)

  if mesh.empty:
    return per_device(q_BTNH, k_BSKH, v_BSKH, q_segment_ids_BT, kv_segment_ids_BS, kernel)
  batch_spec, length_spec, heads_spec = (axes or None for axes in (batch_axes, length_axes, heads_axes))
  q_spec, kv_spec = P(batch_spec, length_spec, heads_spec, None), P(batch_spec, None, heads_spec, None)
  kernel_spec = kernel.manual_sharding_spec(NamedSharding(mesh, P(heads_spec, length_spec if causal else None)))
  sharded = jax.shard_map(
      per_device,
      mesh=mesh,
      in_specs=(q_spec, kv_spec, kv_spec, P(batch_spec, length_spec), P(batch_spec, None), kernel_spec),
      out_specs=q_spec,
      check_vma=False,
  )
  return sharded(q_BTNH, k_BSKH, v_BSKH, q_segment_ids_BT, kv_segment_ids_BS, kernel)


def kernel_name(attention: str, platform: str) -> str:
  """The kernel model.attention=`attention` runs on `platform`: "auto" is cuDNN's on NVIDIA GPUs, splash on
  TPUs, XLA elsewhere."""
  if attention != "auto":
    return attention
  return {"gpu": "cudnn", "tpu": "splash"}.get(platform, "xla")


def auto_attention(
    q_BTNH, k_BSKH, v_BSKH, q_segment_ids_BT, kv_segment_ids_BS, q_start=None, max_documents: int = 32, **options
) -> jax.Array:
  """The platform's fast kernel (see kernel_name)."""
  name = kernel_name("auto", current_platform())
  if name == "cudnn":
    options["max_documents"] = max_documents
  kernel = {"cudnn": cudnn_attention, "splash": splash_attention, "xla": xla_attention}[name]
  return kernel(q_BTNH, k_BSKH, v_BSKH, q_segment_ids_BT, kv_segment_ids_BS, q_start, **options)


KERNELS = {
    "auto": auto_attention,
    "xla": xla_attention,
    "dot_product": dot_product_attention,
    "cudnn": cudnn_attention,
    "splash": splash_attention,
}


class Attention(nn.Module):
  """Projects to queries, keys and values, applies the kernel, and projects back to D.

  Self-attention reads keys and values from its own input; cross-attention (`cross`) from another
  sequence (the encoder's output), with that sequence's segment ids, and never causally.
  With `decode`, keys and values also go into a cache (collection "cache"): self-attention's grows
  with each call, so generation feeds only the new tokens; cross-attention's is filled once, by the
  call that passes the encoder's output, and read by the calls that pass None.
  model.init(..., decode=True) sizes the self-attention cache by the length of its inputs.
  """

  cfg: layers.ModelConfig
  decode: bool = False
  causal: bool = True  # False: every key of the query's segment (encoders; cross-attention is never causal)
  cross: bool = False
  rotary: bool | None = None  # rotary positions on queries and keys; None: the llama family's
  scale: float | None = None  # on the scores; None: head_dim ** -0.5 (T5 folds it into its initialization: 1.0)

  @nn.compact
  def __call__(
      self,
      x_BTD: jax.Array,
      segment_ids_BT: jax.Array | None,
      positions_BT: jax.Array,
      source_BSD: jax.Array | None = None,  # cross-attention: the sequence keys and values come from
      source_segment_ids_BS: jax.Array | None = None,
      bias_BNTS: jax.Array | None = None,  # added to the scores (T5's relative positions)
  ) -> jax.Array:
    cfg = self.cfg
    head_dim = layers.head_dim(cfg)
    projection = functools.partial(layers.Projection, cfg)
    q_BTNH = projection((cfg.num_heads, head_dim), ("embed", "heads", "head_dim"), name="query")(x_BTD)
    q_BTNH = layers.constrain(q_BTNH, ("activation_batch", "activation_length", "activation_heads", "activation_head_dim"))
    q_BTNH = checkpoint_name(q_BTNH, "query_proj")
    if self.cross:
      k_BSKH, v_BSKH, kv_segment_ids_BS = self._source_keys(source_BSD, source_segment_ids_BS)
      q_start, causal = None, False
      if segment_ids_BT is None:  # one document per row, which must still skip the source's padding (segment 0)
        segment_ids_BT = jnp.ones(x_BTD.shape[:2], jnp.int32)
    else:
      k_BSKH, v_BSKH = self._keys_and_values(x_BTD)
      if cfg.family == "llama" if self.rotary is None else self.rotary:
        inv_freq_F = layers.rope_frequencies(cfg)
        q_BTNH = layers.apply_rotary(q_BTNH, positions_BT, inv_freq_F)
        k_BSKH = layers.apply_rotary(k_BSKH, positions_BT, inv_freq_F)
      kv_segment_ids_BS, q_start, causal = segment_ids_BT, None, self.causal
      if self.decode and self.has_variable("cache", "cached_key"):
        k_BSKH, v_BSKH, kv_segment_ids_BS, q_start = self._append_to_cache(k_BSKH, v_BSKH, segment_ids_BT)
      elif self.decode:  # model.init: create the empty cache, as long as these inputs
        self.variable("cache", "cached_key", jnp.zeros, k_BSKH.shape, k_BSKH.dtype)
        self.variable("cache", "cached_value", jnp.zeros, v_BSKH.shape, v_BSKH.dtype)
        self.variable("cache", "cached_segment_ids", jnp.zeros, segment_ids_BT.shape, jnp.int32)  # 0: empty slot
        self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))

    kernel = functools.partial(KERNELS[cfg.attention], causal=causal, bias_BNTS=bias_BNTS, scale=self.scale)
    if cfg.attention in ("auto", "cudnn"):
      kernel = functools.partial(kernel, max_documents=cfg.cudnn_max_documents)
    out_BTNH = kernel(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, kv_segment_ids_BS, q_start)

    out_BTD = projection((cfg.embed_dim,), ("heads", "head_dim", "embed"), residual=True, name="out")(out_BTNH)
    return checkpoint_name(out_BTD, "out_proj")

  def _keys_and_values(self, x_BSD: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The keys and values of a sequence: [B, S, K, H] each."""
    cfg = self.cfg
    head_dim = layers.head_dim(cfg)
    axes = ("activation_batch", "activation_length", "activation_kv_heads", "activation_head_dim")
    k_BSKH = layers.Projection(cfg, (cfg.num_kv_heads, head_dim), ("embed", "kv_heads", "head_dim"), name="key")(x_BSD)
    v_BSKH = layers.Projection(cfg, (cfg.num_kv_heads, head_dim), ("embed", "kv_heads", "head_dim"), name="value")(x_BSD)
    k_BSKH = checkpoint_name(layers.constrain(k_BSKH, axes), "key_proj")
    v_BSKH = checkpoint_name(layers.constrain(v_BSKH, axes), "value_proj")
    return k_BSKH, v_BSKH

  def _source_keys(self, source_BSD, source_segment_ids_BS):
    """Cross-attention's keys, values and key segment ids: from the source, or (decoding, source None) from
    the cache the first call filled, so the encoder's keys are projected once per generation."""
    if source_BSD is not None:
      k_BSKH, v_BSKH = self._keys_and_values(source_BSD)
      if source_segment_ids_BS is None:
        source_segment_ids_BS = jnp.ones(source_BSD.shape[:2], jnp.int32)
      if self.decode:
        self.put_variable("cache", "source_key", k_BSKH)
        self.put_variable("cache", "source_value", v_BSKH)
        self.put_variable("cache", "source_segment_ids", source_segment_ids_BS.astype(jnp.int32))
      return k_BSKH, v_BSKH, source_segment_ids_BS
    if not (self.decode and self.has_variable("cache", "source_key")):
      raise ValueError("cross-attention needs the encoder's output (or, decoding, a cache filled with it)")
    cache = self.variables["cache"]
    return cache["source_key"], cache["source_value"], cache["source_segment_ids"]

  def _append_to_cache(self, k_BTKH, v_BTKH, segment_ids_BT):
    """Writes the new keys / values at the cache's index; returns the whole cache and where the queries start."""
    key, value = self.variable("cache", "cached_key"), self.variable("cache", "cached_value")
    segment_ids, index = self.variable("cache", "cached_segment_ids"), self.variable("cache", "cache_index")
    start = index.value
    key.value = jax.lax.dynamic_update_slice(key.value, k_BTKH.astype(key.value.dtype), (0, start, 0, 0))
    value.value = jax.lax.dynamic_update_slice(value.value, v_BTKH.astype(value.value.dtype), (0, start, 0, 0))
    segment_ids.value = jax.lax.dynamic_update_slice(segment_ids.value, segment_ids_BT.astype(jnp.int32), (0, start))
    index.value = start + k_BTKH.shape[1]
    return key.value, value.value, segment_ids.value, start

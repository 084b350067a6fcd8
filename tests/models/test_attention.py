"""Attention kernels: packed documents stay apart, kernels agree, GQA is MHA with shared heads."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm.models import attention

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
B, T, N, K, H = 2, 12, 4, 2, 8


def _qkv(seed=0):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  return (
      jax.random.normal(kq, (B, T, N, H)),
      jax.random.normal(kk, (B, T, K, H)),
      jax.random.normal(kv, (B, T, K, H)),
  )


@pytest.mark.parametrize("kernel", sorted(attention.KERNELS))
def test_packed_documents_equal_each_document_alone(kernel):
  q, k, v = _qkv()
  boundary = 5
  segment_ids = jnp.array([[1] * boundary + [2] * (T - boundary)] * B)
  packed = attention.KERNELS[kernel](q, k, v, segment_ids, segment_ids)

  def alone(part):
    length = part.stop - part.start
    ones = jnp.ones((B, length), jnp.int32)
    return attention.KERNELS[kernel](q[:, part], k[:, part], v[:, part], ones, ones)

  np.testing.assert_allclose(packed[:, :boundary], alone(slice(0, boundary)), atol=1e-6)
  np.testing.assert_allclose(packed[:, boundary:], alone(slice(boundary, T)), atol=1e-6)


@pytest.mark.parametrize("kernel", sorted(attention.KERNELS))
def test_causal_future_tokens_do_not_change_the_past(kernel):
  q, k, v = _qkv()
  segment_ids = jnp.ones((B, T), jnp.int32)
  changed_v = v.at[:, 7:].set(100.0)
  out = attention.KERNELS[kernel](q, k, v, segment_ids, segment_ids)
  out_changed = attention.KERNELS[kernel](q, k, changed_v, segment_ids, segment_ids)
  np.testing.assert_allclose(out[:, :7], out_changed[:, :7], atol=1e-6)
  assert not np.allclose(out[:, 7:], out_changed[:, 7:])


def test_kernels_agree():
  q, k, v = _qkv(1)
  segment_ids = jnp.array([[1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 3], [1] * 6 + [0] * 6])
  np.testing.assert_allclose(
      attention.xla_attention(q, k, v, segment_ids, segment_ids),
      attention.dot_product_attention(q, k, v, segment_ids, segment_ids),
      atol=1e-5,
  )


@pytest.mark.parametrize("kernel", sorted(attention.KERNELS))
def test_grouped_query_equals_multi_head_with_repeated_kv(kernel):
  q, k, v = _qkv(2)
  segment_ids = jnp.ones((B, T), jnp.int32)
  # Query head n uses key/value head n // (N // K).
  k_mha, v_mha = jnp.repeat(k, N // K, axis=2), jnp.repeat(v, N // K, axis=2)
  np.testing.assert_allclose(
      attention.KERNELS[kernel](q, k, v, segment_ids, segment_ids),
      attention.KERNELS[kernel](q, k_mha, v_mha, segment_ids, segment_ids),
      atol=1e-6,
  )


def test_matches_hand_computed_softmax():
  q, k, v = _qkv(3)
  segment_ids = jnp.ones((B, T), jnp.int32)
  out = attention.xla_attention(q, k, v, segment_ids, segment_ids)
  b, t, n = 1, 6, 3
  kv_head = n // (N // K)
  scores = np.array([np.dot(q[b, t, n], k[b, s, kv_head]) / np.sqrt(H) for s in range(t + 1)])
  probs = np.exp(scores - scores.max()) / np.exp(scores - scores.max()).sum()
  expected = sum(probs[s] * np.array(v[b, s, kv_head]) for s in range(t + 1))
  np.testing.assert_allclose(out[b, t, n], expected, atol=1e-5)


@pytest.mark.parametrize("kernel", sorted(attention.KERNELS))
def test_queries_at_an_offset_match_the_same_rows_of_full_attention(kernel):
  """Decoding: queries T0.. of a sequence, against all keys, with q_start = T0."""
  q, k, v = _qkv(4)
  segment_ids = jnp.array([[0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1], [1] * T])  # row 0 is left-padded
  full = attention.KERNELS[kernel](q, k, v, segment_ids, segment_ids)
  start = 7
  tail = attention.KERNELS[kernel](q[:, start:], k, v, segment_ids[:, start:], segment_ids, start)
  np.testing.assert_allclose(tail, full[:, start:], atol=1e-5)


def test_cudnn_kernel_falls_back_to_the_same_numbers_without_a_gpu():
  q, k, v = _qkv(5)
  segment_ids = jnp.array([[1] * 5 + [2] * 7, [1] * T])
  np.testing.assert_allclose(
      attention.cudnn_attention(q, k, v, segment_ids, segment_ids),
      attention.xla_attention(q, k, v, segment_ids, segment_ids),
      atol=1e-5,
  )


@pytest.mark.parametrize("platform, expected", [("gpu", "cudnn"), ("tpu", "splash"), ("cpu", "xla")])
def test_auto_picks_the_platforms_kernel(monkeypatch, platform, expected):
  called = []
  for name in ("cudnn", "splash", "xla"):
    monkeypatch.setattr(attention, f"{name}_attention", lambda *args, name=name, **options: called.append((name, options)))
  monkeypatch.setattr(attention, "current_platform", lambda: platform)
  q, k, v = _qkv()
  attention.auto_attention(q, k, v, None, None, max_documents=7)
  assert called == [(expected, {"max_documents": 7} if expected == "cudnn" else {})]


# Splash attention tiles sequences by 128 tokens: these inputs are long enough for it to run.
SPLASH_T = 256
SPLASH_SEGMENT_IDS = jnp.array([[1] * 100 + [2] * 156, [1] * 30 + [2] * 200 + [3] * 26], jnp.int32)


def _splash_inputs(seed=0, length=SPLASH_T, head_dim=64):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  return (
      jax.random.normal(kq, (B, length, N, head_dim)),
      jax.random.normal(kk, (B, length, K, head_dim)),
      jax.random.normal(kv, (B, length, K, head_dim)),
  )


def _output_and_gradients(kernel, q, k, v, segment_ids):
  """The kernel's output and the gradients of a weighted sum of it with respect to q, k and v."""
  cotangent = jax.random.normal(jax.random.key(9), q.shape)

  def weighted_sum(q, k, v):
    out = kernel(q, k, v, segment_ids, segment_ids)
    return jnp.sum(out * cotangent), out

  (_, out), grads = jax.jit(jax.value_and_grad(weighted_sum, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return out, grads


def _assert_close_to_xla(kernel, q, k, v, segment_ids):
  out, grads = _output_and_gradients(kernel, q, k, v, segment_ids)
  expected_out, expected_grads = _output_and_gradients(attention.xla_attention, q, k, v, segment_ids)
  np.testing.assert_allclose(out, expected_out, atol=1e-5)
  for name, got, expected in zip("qkv", grads, expected_grads):
    # Gradients sum over up to 256 positions; compare relative to their scale.
    np.testing.assert_allclose(got, expected, atol=1e-5 * float(jnp.max(jnp.abs(expected))), err_msg=f"d{name}")


def test_splash_kernel_equals_xla_forward_and_backward_with_packed_documents():
  _assert_close_to_xla(attention.splash_attention, *_splash_inputs(), SPLASH_SEGMENT_IDS)


@pytest.mark.parametrize("data, fsdp, tensor, sequence", [(2, 1, 2, 2), (1, 2, 2, 2), (1, 1, 2, 4)])
def test_splash_kernel_over_a_mesh_equals_one_device(data, fsdp, tensor, sequence):
  """Rows, heads and query positions split over the mesh (shard_map): the numbers of one device, and XLA's."""
  from lm import sharding
  from lm.config import load_config_file

  inputs = _splash_inputs(1)
  one_device = _output_and_gradients(attention.splash_attention, *inputs, SPLASH_SEGMENT_IDS)
  config = load_config_file(os.path.join(REPO, "configs", "default.py"))
  config.mesh.update(data=data, fsdp=fsdp, tensor=tensor, sequence=sequence)
  mesh = sharding.make_mesh(config.mesh)
  with sharding.activate(mesh, sharding.rules(config.mesh)):
    sharded = _output_and_gradients(attention.splash_attention, *inputs, SPLASH_SEGMENT_IDS)
    _assert_close_to_xla(attention.splash_attention, *inputs, SPLASH_SEGMENT_IDS)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), sharded, one_device)


def test_splash_kernel_without_segment_ids_is_causal_attention():
  q, k, v = _splash_inputs(2)
  np.testing.assert_allclose(
      attention.splash_attention(q, k, v, None, None),
      attention.xla_attention(q, k, v, jnp.ones((B, SPLASH_T), jnp.int32), jnp.ones((B, SPLASH_T), jnp.int32)),
      atol=1e-5,
  )


def _segment_ids_from_packing(lengths_BM, offsets_BM1, length):
  """Rebuilds [B, T] document numbers from cuDNN's lengths and offsets (-1 where no document)."""
  segment_ids = np.full((lengths_BM.shape[0], length), -1)
  for row, (lengths, offsets) in enumerate(zip(np.asarray(lengths_BM), np.asarray(offsets_BM1))):
    for document, (size, start) in enumerate(zip(lengths, offsets)):
      if size >= 0:
        segment_ids[row, start : start + size] = document
  return segment_ids


@pytest.mark.parametrize("max_documents", [1, 3, 8])
def test_packed_segments_give_cudnn_each_document(max_documents):
  segment_ids = jnp.array([
      [1, 1, 1, 2, 2, 3, 3, 3, 3, 3, 3, 3],  # three documents
      [5] * 12,  # one
      [1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 9],  # nine
      [0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1],  # padding is a document of its own
  ])  # fmt: skip
  lengths, offsets = attention.packed_segments(segment_ids, max_documents)
  assert lengths.shape == (4, max_documents) and offsets.shape == (4, max_documents + 1)
  rebuilt = _segment_ids_from_packing(lengths, offsets, T)
  for row in range(4):
    starts = np.flatnonzero(np.diff(np.asarray(segment_ids[row]), prepend=-1))
    expected = np.minimum(np.searchsorted(starts, np.arange(T), side="right") - 1, max_documents - 1)
    np.testing.assert_array_equal(rebuilt[row], expected)  # every token covered, past the cap in the last
  assert np.all(np.asarray(offsets)[:, -1] == -1)


def _cudnn_as_documented(query, key, value, q_seqlen, kv_seqlen, q_offsets, kv_offsets, scale, mask_type):
  """Causal (PADDING_CAUSAL) or bidirectional (PADDING) attention within each packed document, read the
  way cuDNN reads what jax hands it.

  jax turns the [B, M] lengths and [B, M + 1] offsets into one list of documents with element
  offsets into the flattened [B, T, heads, H] arrays (its own _fix_seqlen_offsets); cuDNN then
  reads each document's tokens from there, a token being as many elements as that array's heads
  times H. With M = 1, the lengths are each row's unpadded length.
  """
  from jax._src.cudnn import fused_attention_stablehlo as cudnn

  assert mask_type in (cudnn.MaskType.PADDING_CAUSAL, cudnn.MaskType.PADDING)
  causal = mask_type == cudnn.MaskType.PADDING_CAUSAL
  batch, length, num_heads, head_dim = query.shape
  num_kv_heads = key.shape[2]
  if q_offsets.shape[1] == 2:  # one document per row: a padding mask
    documents = [(int(q_seqlen[b, 0]), b * length * num_heads * head_dim, b * length * num_kv_heads * head_dim) for b in range(batch)]
  else:
    q_seqlen, _, q_offsets, kv_offsets = cudnn._fix_seqlen_offsets(q_seqlen, kv_seqlen, q_offsets, kv_offsets, query, key)
    documents = [(int(n), int(q), int(kv)) for n, q, kv in zip(np.ravel(q_seqlen), np.ravel(q_offsets), np.ravel(kv_offsets)) if n > 0]
  q_flat, k_flat, v_flat = (np.asarray(x, np.float64).ravel() for x in (query, key, value))
  out_flat = np.zeros_like(q_flat)
  for size, q_start, kv_start in documents:
    q_tokens = q_flat[q_start : q_start + size * num_heads * head_dim].reshape(size, num_heads, head_dim)
    k_tokens = k_flat[kv_start : kv_start + size * num_kv_heads * head_dim].reshape(size, num_kv_heads, head_dim)
    v_tokens = v_flat[kv_start : kv_start + size * num_kv_heads * head_dim].reshape(size, num_kv_heads, head_dim)
    group = num_heads // num_kv_heads
    scores = np.einsum("tnh,snh->nts", q_tokens, np.repeat(k_tokens, group, axis=1)) * scale
    if causal:
      scores = np.where(np.tril(np.ones((size, size), bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.einsum("nts,snh->tnh", probs, np.repeat(v_tokens, group, axis=1))
    out_flat[q_start : q_start + size * num_heads * head_dim] = out.ravel()
  return jnp.asarray(out_flat.reshape(query.shape), jnp.float32)


@pytest.mark.parametrize(
    "num_kv_heads, max_documents, causal",
    # multi-head, grouped, multi-query; causal (decoders) for every cap, bidirectional (encoders) for two
    [(heads, cap, True) for heads in (N, K, 1) for cap in (1, 2, 3, 8)] + [(K, 1, False), (K, 8, False)],
)
def test_cudnn_packed_documents_as_cudnn_reads_them(monkeypatch, num_kv_heads, max_documents, causal):
  """What lm passes cuDNN, read as cuDNN reads it, is attention (causal or not) within each document;
  past max_documents, a row's last documents are one."""
  from jax._src.cudnn import fused_attention_stablehlo as cudnn

  monkeypatch.setattr(cudnn, "dot_product_attention", _cudnn_as_documented)
  kq, kk, kv = jax.random.split(jax.random.key(7), 3)
  q = jax.random.normal(kq, (B, T, N, H))
  k, v = jax.random.normal(kk, (B, T, num_kv_heads, H)), jax.random.normal(kv, (B, T, num_kv_heads, H))
  segment_ids = jnp.array([[1, 1, 1, 2, 2, 3, 3, 3, 3, 3, 3, 3], [4, 4, 4, 4, 4, 4, 5, 5, 5, 5, 5, 5]])
  out = attention._cudnn_packed_attention(q, k, v, segment_ids, max_documents, causal)
  joined = jnp.minimum(segment_ids - segment_ids[:, :1], max_documents - 1)  # documents past the cap are one
  np.testing.assert_allclose(out, attention.xla_attention(q, k, v, joined, joined, causal=causal), atol=1e-5)


# Bidirectional attention, cross-attention, score bias and scale.


def _reference_attention(q, k, v, mask_BTS, bias_BNTS=None, scale=None):
  """Attention written out in float64: scaled scores plus bias, masked softmax, weighted values."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  group = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
  scores = np.einsum("btnh,bsnh->bnts", q, k) * (q.shape[-1] ** -0.5 if scale is None else scale)
  if bias_BNTS is not None:
    scores = scores + np.asarray(bias_BNTS, np.float64)
  scores = np.where(np.asarray(mask_BTS)[:, None], scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum("bnts,bsnh->btnh", probs, v)


def _same_segment(q_segment_ids, kv_segment_ids):
  return np.asarray(q_segment_ids)[:, :, None] == np.asarray(kv_segment_ids)[:, None, :]


PACKED = jnp.array([[1] * 5 + [2] * 7, [1] * T])


@pytest.mark.parametrize("kernel", sorted(attention.KERNELS))
def test_bidirectional_attention_sees_its_whole_segment_and_nothing_else(kernel):
  q, k, v = _qkv(6)
  out = attention.KERNELS[kernel](q, k, v, PACKED, PACKED, causal=False)
  np.testing.assert_allclose(out, _reference_attention(q, k, v, _same_segment(PACKED, PACKED)), atol=1e-5)
  # A later key of the first segment reaches its first query; nothing crosses into the second segment.
  changed = attention.KERNELS[kernel](q, k, v.at[0, 4].set(100.0), PACKED, PACKED, causal=False)
  assert not np.allclose(changed[0, 0], out[0, 0])
  np.testing.assert_allclose(changed[0, 5:], out[0, 5:], atol=1e-6)


@pytest.mark.parametrize("kernel", sorted(attention.KERNELS))
def test_cross_attention_with_its_own_length_and_segment_ids(kernel):
  """Queries of the decoder (T = 12) attend to the keys of the encoder (S = 7) with the same segment id."""
  q, _, _ = _qkv(7)
  kk, kv = jax.random.split(jax.random.key(8))
  k, v = jax.random.normal(kk, (B, 7, K, H)), jax.random.normal(kv, (B, 7, K, H))
  kv_segment_ids = jnp.array([[1, 1, 1, 2, 2, 2, 0], [1] * 5 + [0] * 2])  # 0: the encoder's padding
  out = attention.KERNELS[kernel](q, k, v, PACKED, kv_segment_ids, causal=False)
  np.testing.assert_allclose(out, _reference_attention(q, k, v, _same_segment(PACKED, kv_segment_ids)), atol=1e-5)
  unsegmented = attention.KERNELS[kernel](q, k, v, None, None, causal=False)
  np.testing.assert_allclose(unsegmented, _reference_attention(q, k, v, np.ones((B, T, 7), bool)), atol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kernel", sorted(attention.KERNELS))
def test_a_bias_is_added_to_the_scores_and_the_scale_multiplies_them(kernel, causal):
  q, k, v = _qkv(9)
  bias = jax.random.normal(jax.random.key(10), (B, N, T, T))
  out = attention.KERNELS[kernel](q, k, v, PACKED, PACKED, causal=causal, bias_BNTS=bias, scale=0.3)
  mask = _same_segment(PACKED, PACKED) & (np.tril(np.ones((T, T), bool)) if causal else True)
  np.testing.assert_allclose(out, _reference_attention(q, k, v, mask, bias, 0.3), atol=1e-5)


@pytest.mark.parametrize("kernel", sorted(attention.KERNELS))
def test_queries_at_an_offset_with_a_bias_match_the_same_rows_of_full_attention(kernel):
  """Decoding T5: the new queries' rows of the bias, against every cached key."""
  q, k, v = _qkv(11)
  segment_ids = jnp.ones((B, T), jnp.int32)
  bias = jax.random.normal(jax.random.key(12), (B, N, T, T))
  full = attention.KERNELS[kernel](q, k, v, segment_ids, segment_ids, bias_BNTS=bias, scale=1.0)
  start = 7
  tail = attention.KERNELS[kernel](
      q[:, start:], k, v, segment_ids[:, start:], segment_ids, start, bias_BNTS=bias[:, :, start:], scale=1.0
  )
  np.testing.assert_allclose(tail, full[:, start:], atol=1e-5)


# Splash tiles by 128: a self-attention of 256 and a cross-attention of 128 queries to 256 keys.
CROSS_Q_SEGMENT_IDS = jnp.array([[1] * 50 + [2] * 78, [1] * 128], jnp.int32)
CROSS_KV_SEGMENT_IDS = jnp.array([[1] * 100 + [2] * 120 + [0] * 36, [1] * 200 + [0] * 56], jnp.int32)


def _cross_inputs(seed=0, q_length=128, kv_length=256, head_dim=32):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  return (
      jax.random.normal(kq, (B, q_length, N, head_dim)),
      jax.random.normal(kk, (B, kv_length, K, head_dim)),
      jax.random.normal(kv, (B, kv_length, K, head_dim)),
  )


def _bidirectional_output_and_gradients(kernel, q, k, v, q_segment_ids, kv_segment_ids):
  """Bidirectional attention's output and the gradients of a weighted sum of it with respect to q, k and v."""
  cotangent = jax.random.normal(jax.random.key(9), q.shape)

  def weighted_sum(q, k, v):
    out = kernel(q, k, v, q_segment_ids, kv_segment_ids, causal=False, scale=0.2)
    return jnp.sum(out * cotangent), out

  (_, out), grads = jax.jit(jax.value_and_grad(weighted_sum, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return out, grads


@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("kernel", ["dot_product", "cudnn", "splash", "auto"])
def test_kernels_agree_with_xla_on_bidirectional_and_cross_attention(kernel, cross):
  """At lengths splash runs at (not its XLA fallback), forward and backward."""
  if cross:
    q, k, v = _cross_inputs(13)
    q_segment_ids, kv_segment_ids = CROSS_Q_SEGMENT_IDS, CROSS_KV_SEGMENT_IDS
  else:
    q, k, v = _splash_inputs(13, head_dim=32)
    q_segment_ids = kv_segment_ids = SPLASH_SEGMENT_IDS
  inputs = (q, k, v, q_segment_ids, kv_segment_ids)
  out, grads = _bidirectional_output_and_gradients(attention.KERNELS[kernel], *inputs)
  expected_out, expected_grads = _bidirectional_output_and_gradients(attention.xla_attention, *inputs)
  np.testing.assert_allclose(out, expected_out, atol=1e-5)
  for name, got, expected in zip("qkv", grads, expected_grads):
    np.testing.assert_allclose(got, expected, atol=1e-5 * float(jnp.max(jnp.abs(expected))), err_msg=f"d{name}")


def test_splash_cross_attention_over_a_mesh_equals_one_device():
  """Rows, heads and query positions split over the mesh, the keys (another length) gathered."""
  from lm import sharding
  from lm.config import load_config_file

  q, k, v = _cross_inputs(14, q_length=256, kv_length=128)
  q_segment_ids = jnp.array([[1] * 100 + [2] * 156, [1] * 256], jnp.int32)
  kv_segment_ids = jnp.array([[1] * 60 + [2] * 60 + [0] * 8, [1] * 128], jnp.int32)
  args = (attention.splash_attention, q, k, v, q_segment_ids, kv_segment_ids)
  one_device = _bidirectional_output_and_gradients(*args)
  config = load_config_file(os.path.join(REPO, "configs", "default.py"))
  config.mesh.update(data=2, fsdp=1, tensor=2, sequence=2)
  with sharding.activate(sharding.make_mesh(config.mesh), sharding.rules(config.mesh)):
    sharded = _bidirectional_output_and_gradients(*args)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), sharded, one_device)
  np.testing.assert_allclose(one_device[0], _bidirectional_output_and_gradients(attention.xla_attention, *args[1:])[0], atol=1e-5)

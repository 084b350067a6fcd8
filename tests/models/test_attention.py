"""Attention kernels: packed documents stay apart, kernels agree, GQA is MHA with shared heads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm.models import attention

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

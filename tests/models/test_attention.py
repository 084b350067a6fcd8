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


@pytest.mark.parametrize("kernel", ["cudnn", "auto"])
def test_gpu_kernels_are_xla_on_a_cpu(kernel):
  q, k, v = _qkv(5)
  segment_ids = jnp.array([[1] * 5 + [2] * 7, [1] * T])
  np.testing.assert_allclose(
      attention.KERNELS[kernel](q, k, v, segment_ids, segment_ids),
      attention.xla_attention(q, k, v, segment_ids, segment_ids),
      atol=1e-5,
  )


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


def test_splash_kernel_over_a_mesh_equals_one_device():
  """Rows, heads and query positions split over data x tensor x sequence (shard_map): the same numbers."""
  from lm import sharding
  from lm.config import load_config_file

  config = load_config_file(os.path.join(REPO, "configs", "default.py"))
  config.mesh.update(data=2, tensor=2, sequence=2)
  mesh = sharding.make_mesh(config.mesh)
  with sharding.activate(mesh, sharding.rules(config.mesh)):
    _assert_close_to_xla(attention.splash_attention, *_splash_inputs(1), SPLASH_SEGMENT_IDS)


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

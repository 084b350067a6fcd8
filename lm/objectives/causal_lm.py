"""Causal language modelling: predict every next token of plain text.

The text is one token stream (documents joined with EOS) cut into windows, so this objective reads
no .jsonl examples. Its loss is the cross-entropy of each target token where `weights` is 1.

Shape letters: B batch, T length, D embed dim, V vocab, C chunk length, N chunks.
"""

import jax
import jax.numpy as jnp
import numpy as np

from lm.config import UserError
from lm.data import batch as batch_lib
from lm.objectives import base


def _chunk_length(length: int, chunk_len: int) -> int:
  """The largest divisor of `length` that is at most `chunk_len` (0: the whole length)."""
  if chunk_len <= 0 or chunk_len >= length:
    return length
  return max(size for size in range(1, chunk_len + 1) if length % size == 0)


def token_scores(model, params, hidden_BTD: jax.Array, targets_BT: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per-token cross-entropy of the model's output layer, its log partition function log(Z), and whether the
  target is the top-scoring token (accuracy): all [B, T], float32.

  The logits are computed model.loss_chunk_len positions at a time and recomputed in the backward
  pass, so the [B, T, V] float32 logits never exist whole: memory holds one [B, C, V] chunk. With one
  chunk (loss_chunk_len 0, or at least T), they are computed whole and kept.
  Chunk c takes positions c, c + n, c + 2n, ... (n chunks), so a device that holds a block of the
  sequence holds a share of every chunk.
  """
  batch, length, embed_dim = hidden_BTD.shape
  chunk = _chunk_length(length, model.cfg.loss_chunk_len)
  num_chunks = length // chunk

  def chunk_scores(carry, chunk_inputs):
    hidden_BCD, targets_BC = chunk_inputs
    logits_BCV = model.output_logits(params, hidden_BCD)
    log_z_BC = jax.nn.logsumexp(logits_BCV, axis=-1)
    # A one-hot select, not a gather: the gather's gradient is a scatter into zeros the size of the
    # logits, which cost 3 ms a step on an H100 (GPT-2 124M); the select's gradient fuses.
    target_logit_BC = jnp.take_along_axis(logits_BCV, targets_BC[..., None], axis=-1)[..., 0]
    hit_BC = jax.lax.stop_gradient(target_logit_BC >= jnp.max(logits_BCV, axis=-1)).astype(jnp.float32)
    return carry, (log_z_BC - target_logit_BC, log_z_BC, hit_BC)

  if num_chunks == 1:  # all positions at once: the logits are kept for the backward pass
    _, scores = chunk_scores(None, (hidden_BTD, targets_BT))
    return scores
  hidden_NBCD = hidden_BTD.reshape(batch, chunk, num_chunks, embed_dim).transpose(2, 0, 1, 3)
  targets_NBC = targets_BT.reshape(batch, chunk, num_chunks).transpose(2, 0, 1)
  _, scores_NBC = jax.lax.scan(jax.checkpoint(chunk_scores), None, (hidden_NBCD, targets_NBC))
  return tuple(score_NBC.transpose(1, 2, 0).reshape(batch, length) for score_NBC in scores_NBC)


def token_losses(model, params, hidden_BTD: jax.Array, targets_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-token cross-entropy and log(Z), [B, T] float32 each (see token_scores)."""
  cross_entropy_BT, log_z_BT, _ = token_scores(model, params, hidden_BTD, targets_BT)
  return cross_entropy_BT, log_z_BT


def weighted_loss_sums(model, params, hidden_BTD: jax.Array, batch: base.Batch, z_loss_weight: float):
  """(loss to minimize, (weighted cross-entropy, weights)) summed over the batch: the cross-entropy of each
  target token where `weights` is non-zero, plus z_loss_weight * log(Z)^2."""
  cross_entropy_BT, log_z_BT = token_losses(model, params, hidden_BTD, batch["targets"])
  weights_BT = batch["weights"]
  loss = jnp.sum((cross_entropy_BT + z_loss_weight * log_z_BT**2) * weights_BT)
  return loss, (jnp.sum(cross_entropy_BT * weights_BT), jnp.sum(weights_BT))


class CausalLM(base.Objective):
  """Next-token prediction; evaluation reports loss, perplexity and bits per byte of the scored tokens."""

  name = "causal_lm"
  reads_examples = False

  def rows_from_stream(self, tokens_BL, window_indices_B, tokenizer, seed):
    """Each window's tokens scored on the next one; nothing random."""
    return batch_lib.from_stream(tokens_BL, tokenizer.eos_id)

  def loss_sums(self, params, model, batch, rng, z_loss_weight):
    hidden_BTD, router = base.hidden_states(params, model, batch, rng)
    return base.with_router_loss(weighted_loss_sums(model, params, hidden_BTD, batch, z_loss_weight), router, model)

  def eval_sums(self, params, model, batch, byte_lengths_V):
    """Weighted cross-entropy (nats), tokens, and the UTF-8 bytes of text they stand for."""
    hidden_BTD, _ = base.hidden_states(params, model, batch, None)
    cross_entropy_BT, _ = token_losses(model, params, hidden_BTD, batch["targets"])
    weights_BT = batch["weights"]
    return {
        "loss_sum": jnp.sum(cross_entropy_BT * weights_BT),
        "tokens": jnp.sum(weights_BT),
        "bytes": jnp.sum(byte_lengths_V[batch["targets"]] * weights_BT),
    }

  def summarize(self, sums):
    """Loss (nats per token), perplexity and bits per byte (comparable across tokenizers)."""
    loss_sum, tokens = float(sums["loss_sum"]), float(sums["tokens"])
    if tokens == 0:
      raise UserError("nothing to evaluate: the batches hold no scored tokens")
    loss = loss_sum / tokens
    return {
        "loss": loss,
        "perplexity": float(np.exp(loss)),
        "bits_per_byte": loss_sum / (np.log(2) * float(sums["bytes"])),
        "tokens": int(tokens),
    }

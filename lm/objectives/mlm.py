"""Masked language modelling (BERT): predict the tokens chosen from plain text, seeing all the rest.

The text is the token stream of causal LM, cut into windows of data.seq_len tokens; each EOS starts
a document (as [CLS] does in BERT), and attention stays within documents. In every row,
objective.mask_rate of the tokens (EOS excluded; at least one) are chosen for prediction: 80% of
them are replaced by the mask token, 10% by a random token and 10% kept, as BERT does. The loss is
the cross-entropy of the original token at the chosen positions only (`weights` 1 there).

The choice is drawn from (data.seed, the window's index in the run's endless sequence of windows),
so the rows of step k depend only on (data.seed, k) and a resumed run masks as the uninterrupted
one. Evaluation draws from (data.seed, the window's index in the split), the same at every evaluation.

Evaluation reports the loss, accuracy (share of chosen tokens predicted exactly) and perplexity.
"""

import jax.numpy as jnp
import numpy as np

from lm.config import ConfigError, UserError
from lm.data import batch as batch_lib
from lm.objectives import base, causal_lm

MASK_PIECE = "<mask>"  # what lm's tokenizers reserve; BERT's tokenizer.json spells it [MASK]
_MASK_PIECES = (MASK_PIECE, "[MASK]")


def mask_id(tokenizer) -> int:
  """The tokenizer's mask token: <mask> (lm's) or [MASK] (BERT's)."""
  for piece in _MASK_PIECES:
    piece_id = tokenizer.token_id(piece)
    if piece_id is not None:
      return piece_id
  raise ConfigError(
      f"data.tokenizer: {tokenizer.path} has no mask token ({' or '.join(_MASK_PIECES)}); masked LM needs one. "
      "Leave data.tokenizer empty to train a tokenizer that reserves it"
  )


def mask_tokens(
    tokens_T: np.ndarray, rng: np.random.Generator, mask_rate: float, mask: int, vocab_size: int, keep: int
) -> tuple[np.ndarray, np.ndarray]:
  """(inputs [T] with the chosen tokens masked, replaced or kept; weights [T], 1 where chosen). Tokens equal
  to `keep` (EOS, the document starts) are never chosen."""
  inputs_T, weights_T = tokens_T.copy(), np.zeros(tokens_T.shape, np.float32)
  eligible = np.flatnonzero(tokens_T != keep)
  if eligible.size == 0:
    return inputs_T, weights_T
  chosen = rng.choice(eligible, size=max(1, round(mask_rate * eligible.size)), replace=False)
  fate = rng.random(chosen.size)  # < 0.8: [MASK]; < 0.9: a random token; else kept as it is
  randomized = chosen[(fate >= 0.8) & (fate < 0.9)]
  inputs_T[chosen[fate < 0.8]] = mask
  inputs_T[randomized] = rng.integers(0, vocab_size, randomized.size)
  weights_T[chosen] = 1.0
  return inputs_T, weights_T


class MaskedLM(base.Objective):
  """BERT's masked LM on plain text."""

  name = "mlm"
  reads_examples = False

  def reserved_pieces(self):
    return [MASK_PIECE]

  def check_tokenizer(self, tokenizer, seq_len):
    mask_id(tokenizer)

  def rows_from_stream(self, tokens_BL, window_indices_B, tokenizer, seed):
    """Windows of T + 1 tokens -> rows of their first T tokens, masked; targets are the tokens themselves."""
    rows = batch_lib.from_stream(tokens_BL, tokenizer.eos_id)  # its segments and positions: documents from each EOS
    tokens_BT = rows["inputs"]
    mask = mask_id(tokenizer)
    inputs_BT, weights_BT = np.empty_like(tokens_BT), np.empty(tokens_BT.shape, np.float32)
    for row, window in enumerate(window_indices_B):
      rng = np.random.default_rng([*seed, int(window)])
      inputs_BT[row], weights_BT[row] = mask_tokens(
          tokens_BT[row], rng, self.config.mask_rate, mask, tokenizer.vocab_size, tokenizer.eos_id
      )
    return {**rows, "inputs": inputs_BT, "targets": tokens_BT, "weights": weights_BT}

  def loss_sums(self, params, model, batch, rng, z_loss_weight):
    hidden_BTD, router = base.hidden_states(params, model, batch, rng)
    return base.with_router_loss(causal_lm.weighted_loss_sums(model, params, hidden_BTD, batch, z_loss_weight), router, model)

  def eval_sums(self, params, model, batch, byte_lengths_V):
    """Weighted cross-entropy, correct predictions and chosen tokens."""
    del byte_lengths_V
    return prediction_sums(model, params, base.hidden_states(params, model, batch, None)[0], batch)

  def summarize(self, sums):
    """Loss (nats per chosen token), accuracy and perplexity over the chosen tokens."""
    return summarize_predictions(sums)


def prediction_sums(model, params, hidden_BTD, batch: base.Batch) -> dict:
  """Summed weighted cross-entropy, correct predictions (target ranked first) and weights of the targets."""
  cross_entropy_BT, _, hit_BT = causal_lm.token_scores(model, params, hidden_BTD, batch["targets"])
  weights_BT = batch["weights"]
  return {
      "loss_sum": jnp.sum(cross_entropy_BT * weights_BT),
      "correct": jnp.sum(hit_BT * weights_BT),
      "tokens": jnp.sum(weights_BT),
  }


def summarize_predictions(sums) -> dict[str, float]:
  """Loss, accuracy and perplexity from summed cross-entropy, correct predictions and scored tokens."""
  tokens = float(sums["tokens"])
  if tokens == 0:
    raise UserError("nothing to evaluate: the batches hold no scored tokens")
  loss = float(sums["loss_sum"]) / tokens
  return {"loss": loss, "accuracy": float(sums["correct"]) / tokens, "perplexity": float(np.exp(loss)), "tokens": int(tokens)}

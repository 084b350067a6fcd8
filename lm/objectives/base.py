"""The interface every objective implements (see lm/objectives/__init__.py)."""

import dataclasses

import flax.linen as nn
import jax
import ml_collections
import numpy as np

# A batch: a dict of [B, T] arrays with the keys of lm.data.batch.
Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Example:
  """One tokenized example, before packing: the model reads `inputs` and is scored on `targets`
  where `weights` is non-zero. All three are [L] arrays, L <= data.seq_len."""

  inputs: np.ndarray  # [L] int32
  targets: np.ndarray  # [L] int32
  weights: np.ndarray  # [L] float32
  cut: bool = False  # whether it was longer than data.seq_len and cut to fit


class Objective:
  """Turns records into examples, and batches into loss and evaluation sums."""

  name = ""
  reads_examples = True  # .jsonl records made into examples; False: plain text as one token stream
  num_classes = 0  # the size of a classification head the model needs (0: none)

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config

  def example(self, record: dict, tokenizer, seq_len: int) -> Example | str:
    """The example of one .jsonl record, or the reason it cannot be one (a key of SKIP_REASONS)."""
    raise NotImplementedError

  def loss_sums(self, params, model: nn.Module, batch: Batch, rng: jax.Array, z_loss_weight: float):
    """(sum of the loss to minimize, (sum of weighted loss, sum of weights)) over a batch.

    Sums rather than means, so microbatches add up to exactly the full batch's totals.
    """
    raise NotImplementedError

  def eval_sums(self, params, model: nn.Module, batch: Batch, byte_lengths_V: jax.Array) -> dict[str, jax.Array]:
    """Sums over a batch that `summarize` turns into metrics; they add up over batches."""
    raise NotImplementedError

  def summarize(self, sums: dict[str, np.ndarray]) -> dict[str, float]:
    """The evaluation metrics from the sums of every batch."""
    raise NotImplementedError


def hidden_states(params, model: nn.Module, batch: Batch, rng: jax.Array | None) -> jax.Array:
  """The model's final normalized activations x_BTD (dropout on when `rng` is given)."""
  return model.apply(
      {"params": params},
      batch["inputs"],
      batch.get("segment_ids"),
      batch["positions"],
      deterministic=rng is None,
      hidden_only=True,
      rngs={"dropout": rng} if rng is not None else {},
  )

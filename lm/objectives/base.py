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

  def reserved_pieces(self) -> list[str]:
    """Pieces a tokenizer trained for this objective must hold (a mask, sentinels), beside what it learns."""
    return []

  def check_tokenizer(self, tokenizer, seq_len: int) -> None:
    """Raises ConfigError when `tokenizer` lacks a piece this objective needs for rows of `seq_len` tokens."""

  def stream_stride(self, seq_len: int) -> int:
    """Objectives that read plain text read windows of stride + 1 tokens of the token stream, `stride` apart."""
    return seq_len

  def batch_lengths(self, seq_len: int) -> dict[str, int]:
    """The length of each [B, length] array of this objective's batches (see lm.data.batch)."""
    return {name: seq_len for name in ("inputs", "targets", "positions", "segment_ids", "weights")}

  def rows_from_stream(self, tokens_BL: np.ndarray, window_indices_B: np.ndarray, tokenizer, seed: tuple[int, ...]) -> dict:
    """Batch rows from windows of the token stream (objectives that read plain text). Anything random in
    row b is drawn from (seed, window_indices_B[b]) alone, so the rows of step k depend only on (seed, k)."""
    raise NotImplementedError

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

"""The interface every objective implements (see lm/objectives/__init__.py)."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
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
    """(sum of the loss to minimize, (sum of weighted loss, sum of weights, router statistics)) over a
    batch; `with_router_loss` adds a mixture of experts' load-balancing loss and statistics.

    Sums rather than means, so microbatches add up to exactly the full batch's totals.
    """
    raise NotImplementedError

  def eval_sums(self, params, model: nn.Module, batch: Batch, byte_lengths_V: jax.Array) -> dict[str, jax.Array]:
    """Sums over a batch that `summarize` turns into metrics; they add up over batches."""
    raise NotImplementedError

  def summarize(self, sums: dict[str, np.ndarray]) -> dict[str, float]:
    """The evaluation metrics from the sums of every batch."""
    raise NotImplementedError


def hidden_states(params, model: nn.Module, batch: Batch, rng: jax.Array | None) -> tuple[jax.Array, dict]:
  """The model's final normalized activations x_BTD (dropout on when `rng` is given), and the routers'
  statistics of a mixture-of-experts model ({} for a dense one), see `router_stats`."""
  hidden_BTD, variables = model.apply(
      {"params": params},
      batch["inputs"],
      batch.get("segment_ids"),
      batch["positions"],
      deterministic=rng is None,
      hidden_only=True,
      rngs={"dropout": rng} if rng is not None else {},
      mutable=["intermediates"],
  )
  return hidden_BTD, router_stats(variables.get("intermediates", {}))


ROUTER_STATS = ("router_aux_loss", "expert_load_max", "expert_load_min", "dropped_tokens")  # scalars, see router_stats


def router_stats(intermediates: dict) -> dict:
  """What the MoE blocks sowed as "router" (stacked [L, ...] when scanned), as scalars: the load-balancing
  loss and the fraction of dropped token choices averaged over layers, and the most and least loaded
  expert's share of token choices times E over every layer (both 1 when perfectly balanced)."""
  per_layer = []

  def collect(tree):
    if isinstance(tree, dict) and "aux_loss" in tree:
      per_layer.append(tree)
    elif isinstance(tree, (dict, tuple, list)):
      for child in tree.values() if isinstance(tree, dict) else tree:
        collect(child)

  collect(intermediates)
  if not per_layer:
    return {}
  aux_loss_L = jnp.concatenate([jnp.reshape(stats["aux_loss"], (-1,)) for stats in per_layer])
  dropped_L = jnp.concatenate([jnp.reshape(stats["dropped"], (-1,)) for stats in per_layer])
  num_experts = per_layer[0]["expert_load"].shape[-1]
  load_LE = jnp.concatenate([jnp.reshape(stats["expert_load"], (-1, num_experts)) for stats in per_layer])
  return {
      "router_aux_loss": jnp.mean(aux_loss_L),
      "expert_load_max": jnp.max(load_LE) * num_experts,
      "expert_load_min": jnp.min(load_LE) * num_experts,
      "dropped_tokens": jnp.mean(dropped_L),
  }


def with_router_loss(loss_sums, router: dict, model: nn.Module):
  """An objective's (loss, (weighted loss, weights)) with the MoE load-balancing loss added, weighted by
  model.router_aux_loss_weight per scored token (so it survives the division by the token count),
  and the router's statistics appended for the step's metrics: (loss, (weighted loss, weights, router))."""
  loss, (weighted_loss, weights) = loss_sums
  if router:
    loss = loss + model.cfg.router_aux_loss_weight * router["router_aux_loss"] * weights
  return loss, (weighted_loss, weights, router)

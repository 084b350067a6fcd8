"""The optax optimizer from `config.optimizer`: global-norm clipping, then AdamW on a schedule.

Updates from non-finite gradients are skipped (optax.apply_if_finite). The optimizer sees the
parameters in float32 (to_float32) and keeps its state in float32, whatever their storage dtype.
"""

import jax
import jax.numpy as jnp
import ml_collections
import optax

_NEVER = 2**31 - 1


def make_schedule(opt: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Learning rate by step: linear warmup from 0, then cosine, linear, constant or warmup-stable-decay."""
  peak = opt.learning_rate
  final = peak * opt.min_learning_rate_ratio
  warmup = opt.warmup_steps
  after_warmup = max(total_steps - warmup, 1)
  warmup_schedule = optax.linear_schedule(0.0, peak, warmup)
  if opt.schedule == "cosine":
    rest = [optax.cosine_decay_schedule(peak, after_warmup, alpha=opt.min_learning_rate_ratio)]
  elif opt.schedule == "linear":
    rest = [optax.linear_schedule(peak, final, after_warmup)]
  elif opt.schedule == "constant":
    rest = [optax.constant_schedule(peak)]
  elif opt.schedule == "wsd":
    decay = min(int(round(opt.decay_fraction * total_steps)), after_warmup)
    rest = [optax.constant_schedule(peak), optax.linear_schedule(peak, final, decay)]
    return optax.join_schedules([warmup_schedule] + rest, [warmup, total_steps - decay])
  else:
    raise ValueError(f"optimizer.schedule: unknown schedule {opt.schedule!r}")
  return optax.join_schedules([warmup_schedule] + rest, [warmup])


def _path_names(path: tuple) -> list[str]:
  return [str(getattr(entry, "key", getattr(entry, "name", entry))) for entry in path]


def parameter_kind(path: tuple) -> set[str]:
  """The kinds ("norm", "bias", "embedding") a parameter belongs to, read from its path in the tree."""
  names = _path_names(path)
  kinds = set()
  if any(name.endswith("norm") for name in names):
    kinds.add("norm")
  if "bias" in names:
    kinds.add("bias")
  if "embedding" in names:
    kinds.add("embedding")
  return kinds


def weight_decay_mask(params, no_weight_decay: tuple[str, ...]):
  """A pytree of bools like `params`: True where AdamW applies weight decay."""
  excluded = set(no_weight_decay)
  return jax.tree_util.tree_map_with_path(lambda path, _: not (parameter_kind(path) & excluded), params)


def to_float32(params):
  """The parameters in float32 (those already float32 unchanged): what the optimizer works on."""
  return jax.tree.map(lambda leaf: leaf.astype(jnp.float32), params)


def make(opt: ml_collections.ConfigDict, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns (optimizer, learning-rate schedule)."""
  schedule = make_schedule(opt, total_steps)
  adamw = optax.adamw(
      learning_rate=schedule,
      b1=opt.b1,
      b2=opt.b2,
      eps=opt.eps,
      weight_decay=opt.weight_decay,
      mask=lambda params: weight_decay_mask(params, tuple(opt.no_weight_decay)),
  )
  tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), adamw) if opt.grad_clip_norm > 0 else adamw
  # A step whose gradients hold a NaN or an Inf changes nothing, and is counted in the state.
  # optax's own give-up (apply the update after N failures) is disabled: it would write the NaNs
  # into the parameters; the training loop stops the run after train.max_bad_steps instead.
  return optax.apply_if_finite(tx, max_consecutive_errors=_NEVER), schedule


def bad_steps(opt_state: optax.ApplyIfFiniteState) -> tuple[jax.Array, jax.Array]:
  """(non-finite steps in a row up to now, non-finite steps in all), from the state of `make`'s optimizer."""
  return opt_state.notfinite_count, opt_state.total_notfinite

"""Text generation with a KV cache, and `python -m lm.generate --workdir=DIR --prompt="..."`.

Prompts of different lengths are left-padded into one batch: padding gets segment id 0, so no
real token attends to it, and positions count from each prompt's first token. One prefill
call fills the cache with the prompts; then one jitted call per new token appends to it.

Shape letters: B prompts, P longest prompt, S cache length (P + max new tokens), V vocab.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from jax.sharding import Mesh

from lm import cli, sharding
from lm.config import UserError


def sample(logits_BV: jax.Array, rng: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
  """Next token per row: argmax when temperature is 0, else drawn from the top-k / top-p softmax."""
  if temperature == 0.0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = logits_BV.astype(jnp.float32) / temperature
  if top_k > 0:
    kth_largest_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_largest_B1, -jnp.inf, logits_BV)
  if top_p < 1.0:
    # Keep the most likely tokens until their probability reaches top_p (at least one).
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    sorted_probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    mass_before_BV = jnp.cumsum(sorted_probs_BV, axis=-1) - sorted_probs_BV
    num_kept_B1 = jnp.sum(mass_before_BV < top_p, axis=-1, keepdims=True)
    cutoff_B1 = jnp.take_along_axis(sorted_BV, num_kept_B1 - 1, axis=-1)
    logits_BV = jnp.where(logits_BV < cutoff_B1, -jnp.inf, logits_BV)
  return jax.random.categorical(rng, logits_BV).astype(jnp.int32)


def _empty_cache(model: nn.Module, batch: int, length: int):
  """A zero KV cache for `batch` rows of up to `length` tokens."""
  tokens_BS = jnp.zeros((batch, length), jnp.int32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens_BS, tokens_BS, tokens_BS, decode=True))
  return jax.tree.map(lambda leaf: jnp.zeros(leaf.shape, leaf.dtype), shapes["cache"])


def _prefill(params, tokens_BP, segment_ids_BP, positions_BP, *, model, cache_length):
  cache = _empty_cache(model, tokens_BP.shape[0], cache_length)
  logits_BPV, variables = model.apply(
      {"params": params, "cache": cache}, tokens_BP, segment_ids_BP, positions_BP, decode=True, mutable=["cache"]
  )
  return logits_BPV[:, -1], variables["cache"]


def _decode_step(params, cache, tokens_B, positions_B, *, model):
  tokens_B1 = tokens_B[:, None]
  logits_B1V, variables = model.apply(
      {"params": params, "cache": cache}, tokens_B1, jnp.ones_like(tokens_B1), positions_B[:, None], decode=True,
      mutable=["cache"],
  )  # fmt: skip
  return logits_B1V[:, 0], variables["cache"]


def generate_ids(
    model: nn.Module,
    params,
    mesh: Mesh,
    axis_rules: sharding.Rules,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    eos_id: int,
    vocab_size: int | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
) -> list[list[int]]:
  """New token ids for each prompt (each non-empty), stopping after EOS (kept) or max_new_tokens.

  Only ids below `vocab_size` (the tokenizer's; the embedding may be padded past it) are drawn.
  """
  if any(not prompt for prompt in prompts):
    raise UserError("every prompt needs at least one token")
  if max_new_tokens < 1:
    raise UserError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if temperature < 0.0:
    raise UserError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
  if not 0.0 < top_p <= 1.0:
    raise UserError(f"top_p must be in (0, 1] (1 is off), got {top_p}")
  if top_k < 0:
    raise UserError(f"top_k must be >= 0 (0 is off), got {top_k}")
  data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
  num_rows = -(-len(prompts) // data_parallel) * data_parallel  # filler rows keep the batch divisible
  rows = prompts + [prompts[0]] * (num_rows - len(prompts))
  prompt_length = max(len(row) for row in rows)
  cache_length = prompt_length + max_new_tokens
  if model.cfg.family == "gpt2" and cache_length > model.cfg.max_seq_len:
    raise UserError(
        f"the longest prompt ({prompt_length} tokens) plus max_new_tokens ({max_new_tokens}) exceed "
        f"model.max_seq_len={model.cfg.max_seq_len}, the length of GPT-2's position table"
    )

  pad_lengths = np.array([prompt_length - len(row) for row in rows])
  tokens_BP = np.array([[0] * pad + row for pad, row in zip(pad_lengths, rows)], np.int32)
  segment_ids_BP = (np.arange(prompt_length)[None, :] >= pad_lengths[:, None]).astype(np.int32)
  positions_BP = np.maximum(np.arange(prompt_length)[None, :] - pad_lengths[:, None], 0).astype(np.int32)

  prefill = sharding.MeshJit(jax.jit(functools.partial(_prefill, model=model, cache_length=cache_length)), mesh, axis_rules)
  decode_step = sharding.MeshJit(jax.jit(functools.partial(_decode_step, model=model), donate_argnums=(1,)), mesh, axis_rules)
  vocab_size = vocab_size or model.cfg.vocab_size
  top_k = min(top_k, vocab_size)  # a k past the vocabulary keeps every token

  @jax.jit
  def choose(logits_BV, rng):
    logits_BV = jnp.where(jnp.arange(logits_BV.shape[-1]) < vocab_size, logits_BV, -jnp.inf)
    return sample(logits_BV, rng, temperature, top_k, top_p)

  logits_BV, cache = prefill(params, tokens_BP, segment_ids_BP, positions_BP)
  positions_B = jnp.asarray(prompt_length - pad_lengths, jnp.int32)
  rng = jax.random.key(seed)
  generated, done_B = [], np.zeros(num_rows, bool)
  for index in range(max_new_tokens):
    tokens_B = choose(logits_BV, jax.random.fold_in(rng, index))
    generated.append(tokens_B)
    done_B |= np.asarray(tokens_B) == eos_id
    if done_B[: len(prompts)].all() or index == max_new_tokens - 1:
      break
    logits_BV, cache = decode_step(params, cache, tokens_B, positions_B + index)

  new_tokens = np.stack([np.asarray(tokens_B) for tokens_B in generated], axis=1)
  outputs = []
  for row in new_tokens[: len(prompts)].tolist():
    outputs.append(row[: row.index(eos_id) + 1] if eos_id in row else row)
  return outputs


def main() -> None:
  """`python -m lm.generate`: prints each prompt followed by its continuation."""
  workdir = flags.DEFINE_string("workdir", None, "A run's workdir.", required=True)
  step = flags.DEFINE_integer("step", None, "Checkpoint step; default the latest.")
  prompts = flags.DEFINE_multi_string("prompt", [""], "Prompt text; repeat the flag for several prompts.")
  max_new_tokens = flags.DEFINE_integer("max_new_tokens", 200, "Tokens to generate per prompt, at most.")
  temperature = flags.DEFINE_float("temperature", 0.8, "Sampling temperature; 0 is greedy.")
  top_k = flags.DEFINE_integer("top_k", 0, "Sample from the k most likely tokens only; 0 is off.")
  top_p = flags.DEFINE_float("top_p", 1.0, "Sample from the smallest set of tokens with this much probability; 1 is off.")
  seed = flags.DEFINE_integer("seed", 0, "Random seed.")

  def generate() -> None:
    import lm

    loaded = lm.load(workdir.value, step.value)
    completions = loaded.generate(
        prompts.value, max_new_tokens=max_new_tokens.value, temperature=temperature.value, top_k=top_k.value,
        top_p=top_p.value, seed=seed.value,
    )  # fmt: skip
    for prompt, completion in zip(prompts.value, completions):
      print(prompt + completion)
      if len(prompts.value) > 1:
        print("-" * 80)

  cli.run(generate)


if __name__ == "__main__":
  main()

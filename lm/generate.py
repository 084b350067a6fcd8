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


# Module-level jitted functions with the model and the sampling knobs as static arguments: a second
# call with the same shapes reuses the compiled code.


@functools.partial(jax.jit, static_argnames=("model", "cache_length"))
def _prefill(params, tokens_BP, segment_ids_BP, positions_BP, *, model, cache_length):
  """Fills a fresh cache with the prompts; returns the logits after each prompt and the cache."""
  cache = _empty_cache(model, tokens_BP.shape[0], cache_length)
  logits_BPV, variables = model.apply(
      {"params": params, "cache": cache}, tokens_BP, segment_ids_BP, positions_BP, decode=True, mutable=["cache"]
  )
  return logits_BPV[:, -1], variables["cache"]


@functools.partial(jax.jit, static_argnames=("vocab_size", "temperature", "top_k", "top_p"))
def _choose(logits_BV, rng, index, *, vocab_size, temperature, top_k, top_p):
  """The next token of each row; ids past the tokenizer's vocabulary (embedding padding) are never drawn."""
  logits_BV = jnp.where(jnp.arange(logits_BV.shape[-1]) < vocab_size, logits_BV, -jnp.inf)
  return sample(logits_BV, jax.random.fold_in(rng, index), temperature, top_k, top_p)


@functools.partial(jax.jit, static_argnames=("model",), donate_argnames=("cache",))
def _decode_step(params, cache, tokens_B, prompt_lengths_B, index, *, model):
  """Appends the new tokens (the `index`-th after each prompt) to the cache; returns the next logits and the cache."""
  tokens_B1 = tokens_B[:, None]
  positions_B1 = (prompt_lengths_B + index)[:, None]
  logits_B1V, variables = model.apply(
      {"params": params, "cache": cache}, tokens_B1, jnp.ones_like(tokens_B1), positions_B1, decode=True,
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
  if cache_length > model.cfg.max_seq_len:  # GPT-2 has no positions past it; Llama was never trained on any
    raise UserError(
        f"the longest prompt ({prompt_length} tokens) plus max_new_tokens ({max_new_tokens}) exceed "
        f"model.max_seq_len={model.cfg.max_seq_len}, the longest sequence the model takes; ask for at most "
        f"{max(model.cfg.max_seq_len - prompt_length, 0)} new tokens"
    )

  pad_lengths = np.array([prompt_length - len(row) for row in rows])
  tokens_BP = np.array([[0] * pad + row for pad, row in zip(pad_lengths, rows)], np.int32)
  segment_ids_BP = (np.arange(prompt_length)[None, :] >= pad_lengths[:, None]).astype(np.int32)
  positions_BP = np.maximum(np.arange(prompt_length)[None, :] - pad_lengths[:, None], 0).astype(np.int32)

  vocab_size = vocab_size or model.cfg.vocab_size
  knobs = {"vocab_size": vocab_size, "temperature": temperature, "top_k": min(top_k, vocab_size), "top_p": top_p}
  prompt_lengths_B = np.asarray(prompt_length - pad_lengths, np.int32)
  rng = jax.random.key(seed)
  generated, done_B = [], np.zeros(num_rows, bool)
  with sharding.activate(mesh, axis_rules):
    logits_BV, cache = _prefill(params, tokens_BP, segment_ids_BP, positions_BP, model=model, cache_length=cache_length)
    for index in range(max_new_tokens):
      tokens_B = _choose(logits_BV, rng, index, **knobs)
      generated.append(tokens_B)
      if index < max_new_tokens - 1:  # dispatched before the host looks at the tokens, so the device keeps busy
        logits_BV, cache = _decode_step(params, cache, tokens_B, prompt_lengths_B, index, model=model)
      done_B |= np.asarray(tokens_B) == eos_id
      if done_B[: len(prompts)].all():
        break

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

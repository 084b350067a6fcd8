"""Text generation with a KV cache, and `python -m lm.generate --workdir=DIR --prompt="..."`.

Decoders (`generate_ids`): prompts of different lengths are left-padded into one batch: padding
gets segment id 0, so no real token attends to it, and positions count from each prompt's first
token. One prefill call fills the cache with the prompts; then one jitted call per new token
appends to it.

Encoder-decoders (`generate_encoder_decoder_ids`): the inputs are right-padded (segment id 0) and
encoded once; the decoder starts from a start token at position 0, and its first call also puts
the encoder's keys and values into every cross-attention's cache, so later calls pass only the
new token.

Shape letters: B prompts, P longest prompt, S cache length (P + max new tokens; for an
encoder-decoder, the longest input), V vocab.
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


def _check_knobs(max_new_tokens: int, temperature: float, top_k: int, top_p: float) -> None:
  """One-line UserErrors for sampling arguments out of range."""
  if max_new_tokens < 1:
    raise UserError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if temperature < 0.0:
    raise UserError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
  if not 0.0 < top_p <= 1.0:
    raise UserError(f"top_p must be in (0, 1] (1 is off), got {top_p}")
  if top_k < 0:
    raise UserError(f"top_k must be >= 0 (0 is off), got {top_k}")


def _padded_rows(rows: list[list[int]], mesh: Mesh, axis_rules: sharding.Rules) -> list[list[int]]:
  """`rows` and copies of its first, up to a multiple of the data-parallel size (filler keeps the batch divisible)."""
  data_parallel = sharding.data_parallel(mesh, axis_rules)
  num_rows = -(-len(rows) // data_parallel) * data_parallel
  return rows + [rows[0]] * (num_rows - len(rows))


def _sample_until_done(logits_BV, cache, step, num_outputs, *, max_new_tokens, eos_id, knobs, seed) -> list[list[int]]:
  """Draws a token per row from logits_BV, feeds it back with step(cache, tokens_B, index) -> (logits_BV, cache),
  and stops after max_new_tokens or once the first `num_outputs` rows have drawn EOS; returns those rows'
  tokens up to and including EOS."""
  rng = jax.random.key(seed)
  generated, done_B = [], np.zeros(logits_BV.shape[0], bool)
  for index in range(max_new_tokens):
    tokens_B = _choose(logits_BV, rng, index, **knobs)
    generated.append(tokens_B)
    if index < max_new_tokens - 1:  # dispatched before the host looks at the tokens, so the device keeps busy
      logits_BV, cache = step(cache, tokens_B, index)
    done_B |= np.asarray(tokens_B) == eos_id
    if done_B[:num_outputs].all():
      break
  new_tokens = np.stack([np.asarray(tokens_B) for tokens_B in generated], axis=1)
  outputs = []
  for row in new_tokens[:num_outputs].tolist():
    outputs.append(row[: row.index(eos_id) + 1] if eos_id in row else row)
  return outputs


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
  _check_knobs(max_new_tokens, temperature, top_k, top_p)
  rows = _padded_rows(prompts, mesh, axis_rules)
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

  def step(cache, tokens_B, index):
    return _decode_step(params, cache, tokens_B, prompt_lengths_B, index, model=model)

  with sharding.activate(mesh, axis_rules):
    logits_BV, cache = _prefill(params, tokens_BP, segment_ids_BP, positions_BP, model=model, cache_length=cache_length)
    return _sample_until_done(
        logits_BV, cache, step, len(prompts), max_new_tokens=max_new_tokens, eos_id=eos_id, knobs=knobs, seed=seed
    )


def _empty_encoder_decoder_cache(model: nn.Module, batch: int, source_length: int, cache_length: int):
  """A zero cache for `batch` rows: decoder self-attention for `cache_length` tokens, cross-attention for
  `source_length` encoder positions."""
  source_BS, tokens_BT = jnp.zeros((batch, source_length), jnp.int32), jnp.zeros((batch, cache_length), jnp.int32)
  inputs = (source_BS, source_BS, source_BS, tokens_BT, tokens_BT, tokens_BT)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs, decode=True))
  return jax.tree.map(lambda leaf: jnp.zeros(leaf.shape, leaf.dtype), shapes["cache"])


@functools.partial(jax.jit, static_argnames=("model", "start_id", "cache_length"))
def _encode_and_start(params, tokens_BS, segment_ids_BS, positions_BS, *, model, start_id, cache_length):
  """Encodes the inputs and feeds the decoder its start token (position 0) with the encoder's output, which
  fills every cross-attention's cache; returns the logits after the start token and the cache."""
  encoded_BSD = model.apply({"params": params}, tokens_BS, segment_ids_BS, positions_BS, method="encode")
  cache = _empty_encoder_decoder_cache(model, tokens_BS.shape[0], tokens_BS.shape[1], cache_length)
  start_B1 = jnp.full((tokens_BS.shape[0], 1), start_id, jnp.int32)
  logits_B1V, variables = model.apply(
      {"params": params, "cache": cache}, encoded_BSD, segment_ids_BS, start_B1, jnp.ones_like(start_B1),
      jnp.zeros_like(start_B1), decode=True, method="decode_with", mutable=["cache"],
  )  # fmt: skip
  return logits_B1V[:, 0], variables["cache"]


@functools.partial(jax.jit, static_argnames=("model",), donate_argnames=("cache",))
def _decode_step_from_source(params, cache, tokens_B, index, *, model):
  """Appends the new tokens (the `index`-th after the start token, at position index + 1) to the cache; cross-
  attention reads the encoder's keys from the cache. Returns the next logits and the cache."""
  tokens_B1 = tokens_B[:, None]
  positions_B1 = jnp.full_like(tokens_B1, 1) + index
  logits_B1V, variables = model.apply(
      {"params": params, "cache": cache}, None, None, tokens_B1, jnp.ones_like(tokens_B1), positions_B1,
      decode=True, method="decode_with", mutable=["cache"],
  )  # fmt: skip
  return logits_B1V[:, 0], variables["cache"]


def generate_encoder_decoder_ids(
    model: nn.Module,
    params,
    mesh: Mesh,
    axis_rules: sharding.Rules,
    inputs: list[list[int]],
    *,
    max_new_tokens: int,
    eos_id: int,
    start_id: int,
    vocab_size: int | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
) -> list[list[int]]:
  """An encoder-decoder's (T5's) output token ids for each input (each non-empty): the decoder starts from
  `start_id` (T5's is its padding id, 0) and stops after EOS (kept) or max_new_tokens.

  The inputs are encoded once; the decoder's self-attention keeps a KV cache of 1 + max_new_tokens
  tokens and its cross-attention the encoder's keys, projected on the first call. T5's positions are
  relative, so no length is refused. Only ids below `vocab_size` (the tokenizer's; the embedding may
  be padded past it) are drawn.
  """
  if any(not row for row in inputs):
    raise UserError("every input needs at least one token")
  _check_knobs(max_new_tokens, temperature, top_k, top_p)
  rows = _padded_rows(inputs, mesh, axis_rules)
  source_length = max(len(row) for row in rows)
  # Right padding, segment id 0: cross-attention skips it, and every input's positions start at 0.
  tokens_BS = np.array([row + [0] * (source_length - len(row)) for row in rows], np.int32)
  segment_ids_BS = (np.arange(source_length)[None, :] < np.array([len(row) for row in rows])[:, None]).astype(np.int32)
  positions_BS = np.broadcast_to(np.arange(source_length, dtype=np.int32), tokens_BS.shape)

  vocab_size = vocab_size or model.cfg.vocab_size
  knobs = {"vocab_size": vocab_size, "temperature": temperature, "top_k": min(top_k, vocab_size), "top_p": top_p}

  def step(cache, tokens_B, index):
    return _decode_step_from_source(params, cache, tokens_B, index, model=model)

  with sharding.activate(mesh, axis_rules):
    logits_BV, cache = _encode_and_start(
        params, tokens_BS, segment_ids_BS, positions_BS, model=model, start_id=start_id, cache_length=1 + max_new_tokens
    )
    return _sample_until_done(
        logits_BV, cache, step, len(inputs), max_new_tokens=max_new_tokens, eos_id=eos_id, knobs=knobs, seed=seed
    )


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
    writes_apart = loaded.objective.name == "span_corruption"  # a decoder's output, not a continuation of the prompt
    for prompt, completion in zip(prompts.value, completions):
      print(f"{prompt}\n=> {completion}" if writes_apart else prompt + completion)
      if len(prompts.value) > 1:
        print("-" * 80)

  cli.run(generate)


if __name__ == "__main__":
  main()

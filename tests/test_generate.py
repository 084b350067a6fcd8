"""Generation with the KV cache: greedy decoding equals the full forward pass, sampling obeys its knobs."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lm
from lm import generate, sharding
from lm.config import UserError
from lm import models

PROMPTS = [[5, 17, 3], [9, 2, 44, 61, 7, 100, 8], [1, 30, 30, 30, 12]]


def _model_and_params(config, mesh_sizes):
  config.mesh.update(mesh_sizes)
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules(config.mesh)
  model = models.get(config.model)
  abstract = sharding.abstract_params(model, mesh, rules)
  tokens = jnp.zeros((1, 1), jnp.int32)
  init = jax.jit(lambda rng: nn.unbox(model.init(rng, *[tokens] * model.num_inputs)["params"]), out_shardings=sharding.shardings_of(abstract))
  return model, init(jax.random.key(1)), mesh, rules


@pytest.mark.parametrize(
    "family, model_overrides, mesh_sizes",
    [
        ("llama", {}, {"data": 2, "fsdp": 2, "tensor": 2}),
        ("gpt2", {}, {"data": 1, "fsdp": 4, "tensor": 2}),
        ("llama", {"model.scan_layers": False, "model.attention": "dot_product"}, {"data": 8}),
        ("llama", {"model.num_experts": 4}, {"data": 2, "expert": 2, "fsdp": 2}),
    ],
)
def test_greedy_decoding_with_the_cache_equals_argmax_of_the_full_forward_pass(tiny_config, family, model_overrides, mesh_sizes):
  config = tiny_config(family, model_overrides)
  model, params, mesh, rules = _model_and_params(config, mesh_sizes)
  new_tokens = generate.generate_ids(model, params, mesh, rules, PROMPTS, max_new_tokens=8, eos_id=-1, temperature=0.0)
  forward = jax.jit(lambda params, tokens: model.apply({"params": params}, tokens, jnp.ones_like(tokens), jnp.arange(tokens.shape[1])[None]))
  for prompt, generated in zip(PROMPTS, new_tokens):
    assert len(generated) == 8
    sequence = jnp.array([prompt + generated])
    with sharding.activate(mesh, rules):
      logits = forward(params, sequence)
    predicted = np.asarray(jnp.argmax(logits[0], axis=-1))
    np.testing.assert_array_equal(predicted[len(prompt) - 1 : -1], generated)


def test_generation_stops_after_eos(tiny_config):
  model, params, mesh, rules = _model_and_params(tiny_config("llama"), {"data": 8})
  greedy = generate.generate_ids(model, params, mesh, rules, PROMPTS[:1], max_new_tokens=6, eos_id=-1, temperature=0.0)[0]
  stopped = generate.generate_ids(model, params, mesh, rules, PROMPTS[:1], max_new_tokens=6, eos_id=greedy[2], temperature=0.0)[0]
  assert stopped == greedy[: greedy.index(greedy[2]) + 1]


def test_sampling_knobs():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 2000))
  rng = jax.random.key(0)
  assert set(np.asarray(generate.sample(logits, rng, 0.0, 0, 1.0))) == {0}  # greedy
  assert set(np.asarray(generate.sample(logits, rng, 1.0, 1, 1.0))) == {0}  # top-1
  assert set(np.asarray(generate.sample(logits, rng, 1.0, 2, 1.0))) == {0, 1}  # top-2
  assert set(np.asarray(generate.sample(logits, rng, 1.0, 0, 0.7))) == {0, 1}  # 0.5 + 0.3 reach 0.7
  assert set(np.asarray(generate.sample(logits, rng, 1.0, 0, 0.4))) == {0}
  full = np.asarray(generate.sample(logits, rng, 1.0, 0, 1.0))
  np.testing.assert_allclose(np.bincount(full, minlength=4) / len(full), [0.5, 0.3, 0.15, 0.05], atol=0.04)
  np.testing.assert_array_equal(full, generate.sample(logits, rng, 1.0, 0, 1.0))  # same seed, same draw


def test_only_ids_of_the_tokenizer_are_drawn(tiny_config):
  """The embedding is padded past the tokenizer's vocabulary; the padding ids must never come out."""
  model, params, mesh, rules = _model_and_params(tiny_config("llama"), {"data": 8})
  new_tokens = generate.generate_ids(
      model, params, mesh, rules, PROMPTS, max_new_tokens=20, eos_id=-1, vocab_size=50, temperature=2.0, seed=3
  )
  assert max(max(tokens) for tokens in new_tokens) < 50


@pytest.mark.parametrize(
    "knobs, message",
    [
        ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
        ({"temperature": -1.0}, "temperature must be >= 0"),
        ({"top_p": 0.0}, "top_p must be in (0, 1]"),
        ({"top_p": 1.5}, "top_p must be in (0, 1]"),
        ({"top_k": -2}, "top_k must be >= 0"),
        ({"max_new_tokens": 100}, "exceed model.max_seq_len"),
    ],
)
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_bad_sampling_arguments_are_one_line_errors(tiny_config, knobs, message, family):
  model, params, mesh, rules = _model_and_params(tiny_config(family), {"data": 8})
  arguments = {"max_new_tokens": 4, "eos_id": -1, **knobs}
  with pytest.raises(UserError, match=re.escape(message)):
    generate.generate_ids(model, params, mesh, rules, PROMPTS, **arguments)


def test_a_top_k_past_the_vocabulary_keeps_every_token(tiny_config):
  model, params, mesh, rules = _model_and_params(tiny_config("llama"), {"data": 8})
  unlimited = generate.generate_ids(model, params, mesh, rules, PROMPTS, max_new_tokens=5, eos_id=-1, top_k=0, seed=4)
  too_many = generate.generate_ids(model, params, mesh, rules, PROMPTS, max_new_tokens=5, eos_id=-1, top_k=10**6, seed=4)
  assert too_many == unlimited


def _t5(tiny_config, overrides: dict | None = None):
  """The tiny T5 with an untied output layer and weights large enough that greedy decoding does not just echo."""
  return tiny_config("t5", {"model.tie_embeddings": False, "model.init_std": 0.2, **(overrides or {})})


@pytest.mark.parametrize(
    "model_overrides, mesh_sizes",
    [
        ({}, {"data": 2, "fsdp": 2, "tensor": 2}),
        ({"model.scan_layers": False, "model.attention": "dot_product", "model.num_decoder_layers": 3}, {"data": 8}),
    ],
)
def test_encoder_decoder_greedy_generation_equals_argmax_of_the_full_forward_pass(tiny_config, model_overrides, mesh_sizes):
  """Inputs of different lengths in one right-padded batch (with filler rows), the decoder fed one token at a
  time: each new token is the argmax of the full forward pass over that input alone and the tokens before it."""
  model, params, mesh, rules = _model_and_params(_t5(tiny_config, model_overrides), mesh_sizes)
  new_tokens = generate.generate_encoder_decoder_ids(
      model, params, mesh, rules, PROMPTS, max_new_tokens=8, eos_id=-1, start_id=0, temperature=0.0
  )
  assert len({token for tokens in new_tokens for token in tokens}) > 4  # more than an echo of the start token

  @jax.jit
  def forward(params, source, target):
    arange = lambda x: jnp.arange(x.shape[1])[None]
    encoder_inputs = (source, jnp.ones_like(source), arange(source))
    return model.apply({"params": params}, *encoder_inputs, target, jnp.ones_like(target), arange(target))

  for prompt, generated in zip(PROMPTS, new_tokens):
    assert len(generated) == 8
    with sharding.activate(mesh, rules):
      logits = forward(params, jnp.array([prompt]), jnp.array([[0] + generated]))
    np.testing.assert_array_equal(np.asarray(jnp.argmax(logits[0], axis=-1))[:-1], generated)


def test_encoder_decoder_generation_stops_after_eos_and_checks_its_arguments(tiny_config):
  model, params, mesh, rules = _model_and_params(_t5(tiny_config), {"data": 8})
  arguments = {"max_new_tokens": 6, "start_id": 0, "temperature": 0.0}
  greedy = generate.generate_encoder_decoder_ids(model, params, mesh, rules, PROMPTS[:1], eos_id=-1, **arguments)[0]
  stopped = generate.generate_encoder_decoder_ids(model, params, mesh, rules, PROMPTS[:1], eos_id=greedy[2], **arguments)[0]
  assert stopped == greedy[: greedy.index(greedy[2]) + 1]
  with pytest.raises(UserError, match=re.escape("every input needs at least one token")):
    generate.generate_encoder_decoder_ids(model, params, mesh, rules, [[4], []], eos_id=-1, **arguments)
  with pytest.raises(UserError, match=re.escape("top_p must be in (0, 1]")):
    generate.generate_encoder_decoder_ids(model, params, mesh, rules, PROMPTS, eos_id=-1, **arguments, top_p=0.0)
  sampled = generate.generate_encoder_decoder_ids(
      model, params, mesh, rules, PROMPTS, max_new_tokens=20, eos_id=-1, start_id=0, vocab_size=50, temperature=2.0, seed=3
  )
  assert max(max(tokens) for tokens in sampled) < 50


def test_a_prompt_that_is_not_utf8_is_a_one_line_error(trained_run):
  import subprocess
  import sys

  _, workdir = trained_run
  prompt = b"caf\xe9".decode("utf-8", "surrogateescape")  # what Python makes of a Latin-1 byte in argv
  with pytest.raises(UserError, match=r"^prompt 2: text is not valid UTF-8 at character 4 \(byte 0xe9\)$"):
    lm.load(workdir).generate(["fine", prompt], max_new_tokens=2)
  result = subprocess.run([sys.executable, "-m", "lm.generate", f"--workdir={workdir}", b"--prompt=caf\xe9", "--max_new_tokens=2"],
                          capture_output=True, text=True, timeout=900)  # fmt: skip
  assert result.returncode == 1 and result.stderr.strip().splitlines() == [result.stderr.strip()]

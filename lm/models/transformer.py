"""The decoder-only Transformer: embeddings, a stack of blocks (scanned or not, rematerialized or not), logits.

Shape letters: B batch, T length, D embed dim, V vocab size.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lm.models import attention, layers, moe, pipeline

_PROJECTION_NAMES = ("query_proj", "key_proj", "value_proj", "out_proj", "mlp_up", "mlp_gate", "mlp_down")

# What the backward pass keeps from the forward pass; everything else is recomputed.
REMAT_POLICIES = {
    "none": None,  # no rematerialization: keep every activation
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only each block's input
    "save_dots": jax.checkpoint_policies.save_only_these_names(*_PROJECTION_NAMES),
    "save_qkv_proj": jax.checkpoint_policies.save_only_these_names("query_proj", "key_proj", "value_proj"),
}


class Block(nn.Module):
  """Pre-norm residual block: x + attention(norm(x)), then + mlp(norm(x)).

  Returns (x, None) so that the same module works as the body of nn.scan.
  """

  cfg: layers.ModelConfig
  decode: bool = False
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_BTD: jax.Array, segment_ids_BT: jax.Array, positions_BT: jax.Array) -> tuple[jax.Array, None]:
    cfg = self.cfg
    x_BTD = layers.constrain(x_BTD, layers.ACTIVATION_AXES)
    h_BTD = layers.norm(cfg, "attn_norm")(x_BTD)
    h_BTD = attention.Attention(cfg, self.decode, name="attn")(h_BTD, segment_ids_BT, positions_BT)
    x_BTD = x_BTD + nn.Dropout(cfg.dropout_rate)(h_BTD, deterministic=self.deterministic)
    h_BTD = layers.norm(cfg, "mlp_norm")(x_BTD)
    h_BTD = (moe.MoeMlp(cfg, name="mlp") if cfg.num_experts else layers.Mlp(cfg, name="mlp"))(h_BTD)
    x_BTD = x_BTD + nn.Dropout(cfg.dropout_rate)(h_BTD, deterministic=self.deterministic)
    return layers.constrain(x_BTD, layers.ACTIVATION_AXES), None


def pipelined_block(cfg: layers.ModelConfig):
  """One Block as a function of its parameters, for pipeline.run: block_fn(params, x_BTD, segment_ids, positions),
  rematerialized as cfg.remat_policy says."""
  block = Block(cfg, parent=None)

  def block_fn(params, x_BTD, segment_ids_BT, positions_BT):
    return block.apply({"params": params}, x_BTD, segment_ids_BT, positions_BT)[0]

  if cfg.remat_policy == "none":
    return block_fn
  return jax.checkpoint(block_fn, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=False)


def layer_stack(block: type[nn.Module], cfg: layers.ModelConfig, num_layers: int, num_inputs: int, decode: bool, name: str = "layers", **block_fields):
  """`num_layers` blocks applied in turn, scanned ("layers") or unrolled ("layers_0", ...) and rematerialized
  as cfg says. Call the result inside a compact method as stack(x_BTD, *inputs) -> x_BTD, where every
  block gets the same `num_inputs` inputs and returns (x_BTD, None)."""
  if cfg.remat_policy != "none" and not decode:
    # Inside a scan, CSE cannot undo the rematerialization, so the barrier it needs is skipped.
    block = nn.remat(block, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=not cfg.scan_layers)
  if cfg.scan_layers:
    scanned = nn.scan(
        block,
        variable_axes={"params": 0, "cache": 0, "intermediates": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast,) * num_inputs,
        length=num_layers,
        unroll=layers.scan_unroll(cfg, num_layers),
        metadata_params={nn.PARTITION_NAME: "layers"},
    )(cfg, decode=decode, name=name, **block_fields)
    return lambda x_BTD, *inputs: scanned(x_BTD, *inputs)[0]

  unrolled = [block(cfg, decode=decode, name=f"{name}_{i}", **block_fields) for i in range(num_layers)]

  def apply(x_BTD, *inputs):
    for layer in unrolled:
      x_BTD, _ = layer(x_BTD, *inputs)
    return x_BTD

  return apply


class Transformer(nn.Module):
  """Llama- or GPT-2-style decoder, chosen by cfg.family. Call with [B, T] int32 arrays."""

  cfg: layers.ModelConfig
  num_classes: int = 0  # > 0: a classification head ("classifier", [embed, classes]) for the objective to apply
  num_inputs = 3  # the [B, T] int32 arrays __call__ takes: tokens, segment ids, positions

  @nn.compact
  def __call__(
      self,
      tokens_BT: jax.Array,
      segment_ids_BT: jax.Array,
      positions_BT: jax.Array,
      deterministic: bool = True,
      decode: bool = False,
      hidden_only: bool = False,
  ) -> jax.Array:
    """Returns logits_BTV in the compute dtype; with `hidden_only`, the final normalized activations
    x_BTD instead, for a loss that applies `output_logits` a few positions at a time.

    segment_ids_BT numbers the packed documents of each row; None means one document per row.
    With `decode`, attention appends to and reads from a KV cache (mutable collection "cache").
    """
    cfg = self.cfg
    token_embed = layers.embedding(cfg, cfg.vocab_size, "vocab", "token_embed")
    x_BTD = token_embed(tokens_BT)
    if cfg.family == "gpt2":
      x_BTD = x_BTD + layers.embedding(cfg, cfg.max_seq_len, None, "position_embed")(positions_BT)
    x_BTD = nn.Dropout(cfg.dropout_rate)(x_BTD, deterministic=deterministic)
    x_BTD = layers.constrain(x_BTD, layers.ACTIVATION_AXES)

    num_stages = pipeline.stages()
    if num_stages > 1 and not self.is_initializing() and not decode:
      x_BTD = pipeline.run(
          pipelined_block(cfg), self.variables["params"]["layers"], x_BTD, (segment_ids_BT, positions_BT),
          num_stages, cfg.pipeline_microbatches or 2 * num_stages,
      )  # fmt: skip
    else:
      stack = layer_stack(Block, cfg, cfg.num_layers, num_inputs=2, decode=decode, deterministic=deterministic)
      x_BTD = stack(x_BTD, segment_ids_BT, positions_BT)

    x_BTD = layers.norm(cfg, "final_norm")(x_BTD)
    if self.num_classes and self.is_initializing():  # created here, applied by lm.objectives.classification
      layers.Projection(cfg, (self.num_classes,), ("embed", None), bias=False, fp8=False, name="classifier")(x_BTD)
    if hidden_only and not self.is_initializing():
      return x_BTD
    if cfg.tie_embeddings:
      logits_BTV = token_embed.attend(x_BTD)
    else:
      logits_BTV = layers.Projection(cfg, (cfg.vocab_size,), ("embed", "vocab"), bias=False, fp8=False, name="lm_head")(x_BTD)
    return layers.constrain(logits_BTV, ("activation_batch", "activation_length", "activation_vocab"))

  @nn.nowrap
  def output_logits(self, params: dict, x_BTD: jax.Array) -> jax.Array:
    """The output layer on `hidden_only` activations: logits_BTV in float32 (see output_logits below)."""
    return output_logits(params, self.cfg, x_BTD)


def output_logits(params: dict, cfg: layers.ModelConfig, x_BTD: jax.Array) -> jax.Array:
  """The Transformer's output layer applied to `hidden_only` activations: logits_BTV in float32.

  The same products as the module's own head (tied embedding or lm_head, in the compute dtype),
  accumulated and returned in float32.
  """
  dtype = jnp.dtype(cfg.dtype)
  x_BTD = x_BTD.astype(dtype)
  if cfg.tie_embeddings:
    embedding_VD = params["token_embed"]["embedding"].astype(dtype)
    logits_BTV = layers.logits_einsum("btd,vd->btv", x_BTD, embedding_VD)
  else:
    kernel_DV = params["lm_head"]["kernel"].astype(dtype)
    logits_BTV = layers.logits_einsum("btd,dv->btv", x_BTD, kernel_DV)
  return layers.constrain(logits_BTV, ("activation_batch", "activation_length", "activation_vocab"))


def stack_layers(params: dict, num_layers: int | None = None) -> dict:
  """Converts unscanned params (layers_0 ... layers_{L-1}) to the scanned layout (one "layers" entry).

  Every group of blocks in the tree is converted: the top level's (decoders, BERT), and those
  under "encoder" and "decoder" (T5), each with as many layers as it holds; `num_layers`, when
  given, is the top-level group's count, checked. Stacks on the host (numpy), so a converted
  checkpoint never lands whole on one device.
  """
  count = sum(1 for name in params if name.startswith("layers_"))
  if num_layers is not None and count and count != num_layers:
    raise ValueError(f"expected {num_layers} unscanned layers, found {count}")
  converted = {}
  for name, value in params.items():
    if not name.startswith("layers_"):
      converted[name] = stack_layers(value) if isinstance(value, dict) else value
  if count:
    per_layer = [params[f"layers_{i}"] for i in range(count)]
    converted["layers"] = jax.tree.map(lambda *xs: np.stack(xs), *per_layer)
  return converted


def parameter_shapes(model_config, scan_layers: bool) -> dict:
  """The shape of every parameter of the model `model_config` describes (any family), scanned or not
  (nothing is computed)."""
  from lm import models  # lm.models imports this module

  model_config = ml_collections.ConfigDict(model_config)
  model_config.scan_layers = scan_layers
  model = models.get(model_config)
  tokens_BT = jnp.zeros((1, 1), jnp.int32)
  abstract = jax.eval_shape(model.init, jax.random.key(0), *[tokens_BT] * model.num_inputs)["params"]
  return jax.tree.map(lambda leaf: tuple(leaf.shape), nn.unbox(abstract))

"""What the Hugging Face tables of every model family share: tree paths, kernel layouts, scanned layers.

A family whose tensors map one to one onto lm's parameters (BERT, T5) is described by a table:
a list of (Hugging Face name, path in lm's unscanned params, whether the tensor is a torch Linear
weight, [out, in], the transpose of lm's [in, out] kernel). `export_table` and `import_table`
turn params into tensors and back by such a table.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

from lm import models
from lm.config import ConfigError
from lm.models import transformer

Path = tuple[str, ...]
Table = list[tuple[str, Path, bool]]


def get(tree: dict, path: Path):
  for key in path:
    tree = tree[key]
  return tree


def put(tree: dict, path: Path, value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def kernel_to_hf(kernel: np.ndarray, contracted_dims: int, transpose: bool) -> np.ndarray:
  """[*in, *out] -> [in, out] (GPT-2 Conv1D) or its transpose [out, in] (Linear)."""
  rows = int(np.prod(kernel.shape[:contracted_dims]))
  matrix = kernel.reshape(rows, -1)
  return matrix.T if transpose else matrix


def contracted_dims(path: Path) -> int:
  """How many leading dims of the kernel at `path` are its inputs (the out projection takes heads and head_dim)."""
  return 2 if path[-2] == "out" else 1


def parameter_shapes(model_config, scan_layers: bool) -> dict:
  """The shape of every parameter of the model (any family) `model_config` describes; nothing is computed."""
  model_config = ml_collections.ConfigDict(model_config)
  model_config.scan_layers = scan_layers
  model = models.get(model_config)
  tokens_BT = jnp.zeros((1, 1), jnp.int32)
  abstract = jax.eval_shape(model.init, jax.random.key(0), *[tokens_BT] * model.num_inputs)["params"]
  return jax.tree.map(lambda leaf: tuple(leaf.shape), nn.unbox(abstract))


def unstack_layers(params: dict, num_layers: int) -> dict:
  """The unscanned layout (layers_0 ... layers_{L-1}) of params that hold their blocks either way."""
  if "layers" not in params:
    return params
  rest = {name: value for name, value in params.items() if name != "layers"}
  return {**rest, **{f"layers_{i}": jax.tree.map(lambda x, i=i: x[i], params["layers"]) for i in range(num_layers)}}


def export_table(table: Table, params: dict) -> dict[str, np.ndarray]:
  """Hugging Face tensors of unscanned lm `params` (numpy), as `table` names them."""
  tensors = {}
  for name, path, transpose in table:
    value = get(params, path)
    if path[-1] == "kernel":
      value = kernel_to_hf(value, contracted_dims(path), transpose)
    elif path[-1] in ("bias", "scale"):  # an attention bias is [heads, head_dim] in lm, flat in Hugging Face
      value = value.reshape(-1)
    tensors[name] = np.ascontiguousarray(value)
  return tensors


def import_table(table: Table, model_config, tensors: dict[str, np.ndarray]) -> dict:
  """Unscanned lm params (float32) of Hugging Face `tensors`, as `table` names them; every parameter of the
  model must be named once, so a checkpoint that lacks one, or holds one of another shape, is a ConfigError."""
  shapes = parameter_shapes(model_config, scan_layers=False)
  params: dict = {}
  for name, path, transpose in table:
    if name not in tensors:
      raise ConfigError(f"weights: {name} is missing from the checkpoint")
    value = tensors[name].T if transpose else tensors[name]
    shape = get(shapes, path)
    if value.size != np.prod(shape):
      raise ConfigError(f"weights: {name} has shape {value.shape}, which does not fit {'/'.join(path)} of shape {shape}")
    put(params, path, np.asarray(value, np.float32).reshape(shape))
  unfilled = {jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(shapes, is_leaf=_is_shape)[0]}
  unfilled -= {jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
  if unfilled:  # a table that forgets a parameter would otherwise surface as a failed checkpoint restore
    raise ConfigError(f"weights: nothing in the checkpoint gives {', '.join(sorted(unfilled))}")
  return params


def _is_shape(leaf) -> bool:
  return isinstance(leaf, tuple)


def stack_layers(params: dict, num_layers: int) -> dict:
  """The scanned layout of unscanned params (see transformer.stack_layers)."""
  return transformer.stack_layers(params, num_layers)


def required(tensors: dict[str, np.ndarray], name: str) -> np.ndarray:
  """tensors[name], or a one-line ConfigError naming what the checkpoint lacks."""
  if name not in tensors:
    raise ConfigError(f"weights: {name} is missing from the checkpoint")
  return tensors[name]

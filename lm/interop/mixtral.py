"""Mixtral's mixture-of-experts MLP <-> lm's MoeMlp params (lm/models/moe.py); hf.py does the rest of the
model as Llama's: attention, norms, embeddings.

Shape letters: D embed dim, F expert MLP width, E experts.
"""

import ml_collections
import numpy as np

from lm.config import ConfigError
from lm.interop import tables

# Mixtral's MLP, as the Hub's checkpoints and transformers 5's save_pretrained name it: a router
# (gate) and per expert j, w1 (gate), w3 (up) and w2 (down) Linear weights. transformers 5 renames
# block_sparse_moe to mlp and fuses the experts on loading (see experts_from_hf).
MOE_PREFIX = "block_sparse_moe."


def experts_to_hf(mlp: dict) -> dict[str, np.ndarray]:
  """One MoE block's params (router [D, E], gate and up [E, D, F], down [E, F, D]) as Mixtral's per-expert
  Linear weights, named after block_sparse_moe.: the layout transformers 5's save_pretrained writes, so an
  export reads like any Mixtral checkpoint (from_pretrained fuses the experts as it loads them)."""
  tensors = {"gate.weight": mlp["router"].T}  # [E, D]
  for j in range(mlp["router"].shape[1]):
    tensors[f"experts.{j}.w1.weight"] = mlp["gate"][j].T  # [F, D]
    tensors[f"experts.{j}.w2.weight"] = mlp["down"][j].T  # [D, F]
    tensors[f"experts.{j}.w3.weight"] = mlp["up"][j].T  # [F, D]
  return tensors


def hf_config(model: ml_collections.ConfigDict, llama_fields: dict) -> dict:
  """config.json of a llama-family model with experts: Llama's fields and Mixtral's. The capacity factor is
  how lm runs the experts, not part of the model: transformers is dropless."""
  return {
      "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", **llama_fields,
      "num_local_experts": model.num_experts, "num_experts_per_tok": model.experts_per_token,
      "router_aux_loss_coef": model.router_aux_loss_weight, "router_jitter_noise": 0.0, "sliding_window": None,
      "output_router_logits": False,
  }  # fmt: skip


# Mixtures of experts whose blocks are not Mixtral's, so lm's MoeMlp cannot hold them.
UNSUPPORTED_MOE = {
    "qwen2_moe": "its MoE blocks add a shared expert to the routed ones, its attention q/k/v biases",
    "qwen3_moe": "its attention normalizes each head's queries and keys (q_norm, k_norm)",
}


def model_config(hf: dict, model: ml_collections.ConfigDict) -> None:
  """The mixture-of-experts fields of a Mixtral config.json, onto the llama-family `model`."""
  if hf.get("sliding_window") is not None:
    raise ConfigError(
        f"config.json: sliding_window={hf['sliding_window']} (lm's attention sees the whole context) is not supported by lm's Transformer"
    )
  if hf.get("router_jitter_noise"):  # transformers multiplies a training batch's activations by it
    raise ConfigError(f"config.json: router_jitter_noise={hf['router_jitter_noise']} is not supported by lm's Transformer")
  model.update(
      num_experts=hf.get("num_local_experts", 8), experts_per_token=hf.get("num_experts_per_tok", 2),
      # Dropless, as transformers computes: capacity (a cheaper, lossy schedule) is a choice for training.
      expert_capacity_factor=0.0, router_aux_loss_weight=float(hf.get("router_aux_loss_coef", 0.001)),
  )  # fmt: skip


def experts_from_hf(tensors: dict[str, np.ndarray], prefix: str, num_experts: int) -> dict[str, tuple]:
  """A Mixtral layer's MLP as lm's MoE params, {key: (value, the Hugging Face name it came from)}: router
  [D, E], gate and up [E, D, F], down [E, F, D].

  Two layouts: per expert w1, w3, w2 [F, D], [F, D], [D, F] under block_sparse_moe. (the Hub's
  Mixtral checkpoints, and what transformers 5's save_pretrained writes by default), or, as transformers
  5 holds them in memory (save_pretrained(save_original_format=False) writes it), a router mlp.gate and
  the fused experts mlp.experts.gate_up_proj [E, 2F, D] (gate rows, then up rows) and down_proj [E, D, F].
  """
  fused = prefix + "mlp."
  gate_up, down, router = fused + "experts.gate_up_proj", fused + "experts.down_proj", fused + "gate.weight"
  if gate_up in tensors:
    gate_up_EGD = tensors[gate_up]
    width = gate_up_EGD.shape[1] // 2  # an odd width leaves gate and up unequal, which the caller refuses
    return {
        "router": (tables.required(tensors, router).T, router),
        "gate": (gate_up_EGD[:, :width].transpose(0, 2, 1), gate_up),
        "up": (gate_up_EGD[:, width:].transpose(0, 2, 1), gate_up),
        "down": (tables.required(tensors, down).transpose(0, 2, 1), down),
    }  # fmt: skip
  moe = prefix + MOE_PREFIX

  def stacked(weight: str) -> tuple[np.ndarray, str]:
    names = [f"{moe}experts.{j}.{weight}.weight" for j in range(num_experts)]
    return np.stack([tables.required(tensors, name).T for name in names]), f"{moe}experts.*.{weight}.weight"

  return {"router": (tables.required(tensors, moe + "gate.weight").T, moe + "gate.weight"), "gate": stacked("w1"),
          "up": stacked("w3"), "down": stacked("w2")}  # fmt: skip

"""Sequence classification: a label per text, predicted from the text's last token.

A .jsonl record is {"text": ..., "label": ...}; the label is a class number (0 .. num_classes - 1)
or one of objective.class_names. The example is EOS, the text's tokens and a closing EOS ([CLS]
and [SEP] where the tokenizer has them, as BERT's does); a decoder sees the whole text only at that
last token, so a linear head there ("classifier", [embed, classes]) gives the class scores. An
encoder (BERT) sees it all everywhere, and reads the class at the first token, as BERT does at [CLS]
(with no pooler layer: the head reads the encoder's output directly). In the batch, `targets` holds the label at that position
and `weights` is 1 there only, so packed rows hold many examples.

Evaluation reports loss, accuracy, macro-F1 and the F1 of each class.

Shape letters: B batch, T length, D embed dim, K classes.
"""

import jax
import jax.numpy as jnp
import numpy as np

from lm.config import UserError
from lm.objectives import base


def class_names(config) -> list[str]:
  """The names of the classes (objective.class_names, or their numbers)."""
  names = [name.strip() for name in config.class_names.split(",") if name.strip()] if config.class_names else []
  return names or [str(number) for number in range(config.num_classes)]


def classifier_logits(params, x_BTD: jax.Array) -> jax.Array:
  """The classification head on the model's final activations: logits_BTK in float32."""
  kernel_DK = params["classifier"]["kernel"]
  return jnp.einsum("btd,dk->btk", x_BTD.astype(jnp.float32), kernel_DK.astype(jnp.float32))


def f1_scores(confusion_KK: np.ndarray) -> dict[int, float]:
  """F1 of each class that is in the labels or the predictions (rows: true class, columns: predicted)."""
  scores = {}
  for k in range(confusion_KK.shape[0]):
    true_positives = confusion_KK[k, k]
    labelled, predicted = confusion_KK[k, :].sum(), confusion_KK[:, k].sum()
    if labelled + predicted > 0:  # as scikit-learn's f1_score, which averages over these classes only
      scores[k] = float(2 * true_positives / (labelled + predicted))
  return scores


def _piece_or(tokenizer, piece: str, default: int) -> int:
  """The id of `piece` where the tokenizer has it (BERT's [CLS] and [SEP]), else `default`."""
  piece_id = tokenizer.token_id(piece)
  return default if piece_id is None else piece_id


class Classification(base.Objective):
  """Cross-entropy of the head's scores at each example's last token."""

  name = "classification"

  def __init__(self, config, at_first_token: bool = False):
    super().__init__(config)
    self.names = class_names(config)
    self.num_classes = len(self.names)
    # An encoder sees the whole text at every token: BERT reads the class at the first ([CLS]).
    self.at_first_token = at_first_token

  def label_of(self, label) -> int | None:
    """The class number of a record's label (a number, or a name of objective.class_names), None if invalid."""
    if isinstance(label, bool):
      return None
    if isinstance(label, int) and 0 <= label < self.num_classes:
      return label
    if isinstance(label, str) and label in self.names:
      return self.names.index(label)
    return None

  def example(self, record, tokenizer, seq_len):
    if not isinstance(record.get("text"), str) or "label" not in record:
      return "not_an_example"
    label = self.label_of(record["label"])
    if label is None:
      return "bad_label"
    start, end = _piece_or(tokenizer, "[CLS]", tokenizer.eos_id), _piece_or(tokenizer, "[SEP]", tokenizer.eos_id)
    tokens = [start] + tokenizer.encode(record["text"])
    cut = len(tokens) + 1 > seq_len
    tokens = tokens[: seq_len - 1] + [end]
    read_at = 0 if self.at_first_token else -1  # a decoder reads the class at the closing token, having seen all
    targets, weights = np.zeros(len(tokens), np.int32), np.zeros(len(tokens), np.float32)
    targets[read_at], weights[read_at] = label, 1.0
    return base.Example(inputs=np.asarray(tokens, np.int32), targets=targets, weights=weights, cut=cut)

  def _losses(self, params, model, batch, rng):
    """(per-position cross-entropy [B, T], class scores [B, T, K], the routers' statistics)."""
    hidden_BTD, router = base.hidden_states(params, model, batch, rng)
    logits_BTK = classifier_logits(params, hidden_BTD)
    log_z_BT = jax.nn.logsumexp(logits_BTK, axis=-1)
    target_logit_BT = jnp.take_along_axis(logits_BTK, batch["targets"][..., None], axis=-1)[..., 0]
    return log_z_BT - target_logit_BT, logits_BTK, router

  def loss_sums(self, params, model, batch, rng, z_loss_weight):
    del z_loss_weight  # a regularizer of the vocabulary's softmax, which this head does not use
    cross_entropy_BT, _, router = self._losses(params, model, batch, rng)
    weights_BT = batch["weights"]
    loss = jnp.sum(cross_entropy_BT * weights_BT)
    return base.with_router_loss((loss, (loss, jnp.sum(weights_BT))), router, model)

  def eval_sums(self, params, model, batch, byte_lengths_V):
    """Summed loss, the number of examples, and the confusion counts [true class, predicted class]."""
    del byte_lengths_V
    cross_entropy_BT, logits_BTK, _ = self._losses(params, model, batch, None)
    weights_BT = batch["weights"]
    true_BTK = jax.nn.one_hot(batch["targets"], self.num_classes) * weights_BT[..., None]
    predicted_BTK = jax.nn.one_hot(jnp.argmax(logits_BTK, axis=-1), self.num_classes)
    return {
        "loss_sum": jnp.sum(cross_entropy_BT * weights_BT),
        "examples": jnp.sum(weights_BT),
        "confusion": jnp.einsum("btk,btj->kj", true_BTK, predicted_BTK),
    }

  def summarize(self, sums):
    """Loss, accuracy, macro-F1 and f1_<class name> for each class seen in labels or predictions."""
    confusion_KK = np.asarray(sums["confusion"], np.float64)
    examples = float(sums["examples"])
    if examples == 0:
      raise UserError("nothing to evaluate: the batches hold no examples")
    scores = f1_scores(confusion_KK)
    return {
        "loss": float(sums["loss_sum"]) / examples,
        "accuracy": float(np.trace(confusion_KK)) / examples,
        "macro_f1": float(np.mean(list(scores.values()))),
        **{f"f1_{self.names[k]}": score for k, score in scores.items()},
        "examples": int(examples),
    }

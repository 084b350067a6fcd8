"""The objectives' parts: chat templates, response-only weights, packing, classification metrics."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from lm import objectives
from lm.data import batch as batch_lib
from lm.data import examples
from lm.models import Transformer
from lm.objectives import classification, sft


class CharTokenizer:
  """One id per character (offset past the specials); `specials` names extra single-id pieces."""

  path = "chars"

  def __init__(self, specials=()):
    self.eos_id = 1
    self._specials = {piece: 2 + i for i, piece in enumerate(specials)}
    self._offset = 2 + len(specials)

  def token_id(self, piece):
    return self._specials.get(piece)

  def encode(self, text):
    return [self._offset + ord(c) for c in text]

  def decode(self, ids):
    return "".join(chr(i - self._offset) for i in ids if i >= self._offset)


def _objective(name: str, **fields) -> objectives.Objective:
  return objectives.get(ml_collections.ConfigDict({"objective": {"name": name, "chat_template": "auto", "num_classes": 0, "class_names": "", **fields}}))


def test_plain_template_learns_the_response_and_its_eos_only():
  tokenizer = CharTokenizer()
  example = _objective("sft").example({"prompt": "hi", "response": "yo"}, tokenizer, seq_len=64)
  text = tokenizer.decode(example.targets)
  assert text == "### User:\nhi\n### Assistant:\nyo\n"
  learned = [int(t) for t, w in zip(example.targets, example.weights) if w]
  assert learned == tokenizer.encode("yo") + [tokenizer.eos_id]
  assert np.array_equal(example.inputs[1:], example.targets[:-1]) and example.inputs[0] == tokenizer.eos_id


def test_llama3_template_when_the_tokenizer_has_its_tokens():
  tokenizer = CharTokenizer(sft.LLAMA3_TOKENS)
  begin, start, end, eot = (tokenizer.token_id(piece) for piece in sft.LLAMA3_TOKENS)
  chat = {"messages": [
      {"role": "system", "content": "be brief"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
      {"role": "user", "content": "q2"}, {"role": "assistant", "content": "b"},
  ]}  # fmt: skip
  tokens, learned = sft.chat_tokens(sft.messages_of(chat), tokenizer, sft.template_name("auto", tokenizer))
  header = lambda role: [start] + tokenizer.encode(role) + [end] + tokenizer.encode("\n\n")
  expected = [begin] + header("system") + tokenizer.encode("be brief") + [eot] + header("user") + tokenizer.encode("q") + [eot]
  expected += header("assistant") + tokenizer.encode("a") + [eot] + header("user") + tokenizer.encode("q2") + [eot]
  expected += header("assistant") + tokenizer.encode("b") + [eot]
  assert tokens == expected
  assert [t for t, learn in zip(tokens, learned) if learn] == tokenizer.encode("a") + [eot] + tokenizer.encode("b") + [eot]
  assert sft.template_name("auto", CharTokenizer()) == "plain"
  with pytest.raises(Exception, match="objective.chat_template: the tokenizer chars lacks Llama 3's"):
    sft.template_name("llama3", CharTokenizer())


@pytest.mark.parametrize("record, reason", [
    ({"prompt": "p"}, "not_an_example"),
    ({"messages": [{"role": "user", "content": "only a question"}]}, "not_an_example"),
    ({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}, "not_an_example"),
    ({"text": 3, "label": 0}, "not_an_example"),
])  # fmt: skip
def test_records_that_are_no_example_say_why(record, reason):
  name = "classification" if "text" in record else "sft"
  assert _objective(name, num_classes=2).example(record, CharTokenizer(), 32) == reason


def test_a_long_example_is_cut_and_counted():
  tokenizer = CharTokenizer()
  assert _objective("sft").example({"prompt": "p" * 60, "response": "r"}, tokenizer, seq_len=40) == "no_response"
  example = _objective("sft").example({"prompt": "p" * 10, "response": "r" * 100}, tokenizer, seq_len=40)
  assert example.cut and len(example.inputs) == 40 and example.weights.sum() > 0
  short = _objective("sft").example({"prompt": "p", "response": "r"}, tokenizer, seq_len=40)
  assert not short.cut


def test_classification_reads_the_label_at_the_closing_eos():
  tokenizer = CharTokenizer()
  objective = _objective("classification", class_names="neg, pos")
  example = objective.example({"text": "good", "label": "pos"}, tokenizer, seq_len=16)
  assert list(example.inputs) == [1] + tokenizer.encode("good") + [1]
  assert list(example.weights) == [0, 0, 0, 0, 0, 1] and example.targets[-1] == 1
  assert objective.example({"text": "bad", "label": 0}, tokenizer, 16).targets[-1] == 0
  for label in ("maybe", 2, -1, True, 1.0):
    assert objective.example({"text": "x", "label": label}, tokenizer, 16) == "bad_label"
  cut = objective.example({"text": "x" * 40, "label": 1}, tokenizer, 16)
  assert cut.cut and len(cut.inputs) == 16 and cut.inputs[-1] == tokenizer.eos_id and cut.weights[-1] == 1


def test_sft_loss_depends_on_response_targets_only(tiny_config):
  """Changing the targets of prompt tokens leaves the loss alone; changing those of response tokens does not."""
  config = tiny_config("llama", {"objective.name": "sft", "data.source": "builtin"})
  objective = objectives.get(config)
  tokenizer = CharTokenizer()
  rows = [[objective.example({"prompt": "ab", "response": "cd"}, tokenizer, 64)], []]
  batch = {name: jnp.asarray(value) for name, value in batch_lib.from_examples(rows, 64).items()}
  batch["inputs"] = batch["inputs"] % config.model.vocab_size
  batch["targets"] = batch["targets"] % config.model.vocab_size
  model = Transformer(ml_collections.FrozenConfigDict(config.model))
  params = nn.unbox(model.init(jax.random.key(0), batch["inputs"], batch["segment_ids"], batch["positions"])["params"])

  def loss(targets):
    total, (cross_entropy, weights, _) = objective.loss_sums(params, model, {**batch, "targets": targets}, None, 0.0)
    return float(cross_entropy / weights)

  prompt_BT = (batch["weights"] == 0) & (batch["segment_ids"] > 0)
  response_BT = batch["weights"] > 0
  assert int(response_BT.sum()) == 3  # "cd" and EOS
  changed = (batch["targets"] + 7) % config.model.vocab_size
  assert loss(jnp.where(prompt_BT, changed, batch["targets"])) == loss(batch["targets"])
  assert loss(jnp.where(response_BT, changed, batch["targets"])) != loss(batch["targets"])


def test_examples_are_packed_whole_in_their_own_segments():
  lengths = np.array([5, 3, 4, 8, 1, 2])
  rows = examples.pack(lengths, np.arange(6), seq_len=8, max_examples=32)
  assert [list(row) for row in rows] == [[0, 1], [2], [3], [4, 5]]
  assert all(lengths[row].sum() <= 8 for row in rows)
  # cuDNN keeps only so many segments apart: a row never holds more, on any platform
  assert [list(row) for row in examples.pack(np.ones(7, np.int64), np.arange(7), seq_len=8, max_examples=3)] == [
      [0, 1, 2], [3, 4, 5], [6]]  # fmt: skip
  made = [objectives.Example(np.full(n, i + 10, np.int32), np.full(n, i, np.int32), np.ones(n, np.float32)) for i, n in enumerate(lengths)]
  packed = batch_lib.from_examples([[made[i] for i in row] for row in rows], 8)
  assert packed["segment_ids"][0].tolist() == [1] * 5 + [2] * 3
  assert packed["positions"][0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
  assert packed["segment_ids"][1].tolist() == [1] * 4 + [0] * 4 and packed["weights"][1].tolist() == [1] * 4 + [0] * 4
  assert packed["inputs"][3].tolist() == [14, 15, 15, 0, 0, 0, 0, 0]


def _f1_by_hand(true: list[int], predicted: list[int], k: int) -> float | None:
  tp = sum(t == k and p == k for t, p in zip(true, predicted))
  fp = sum(t != k and p == k for t, p in zip(true, predicted))
  fn = sum(t == k and p != k for t, p in zip(true, predicted))
  if tp + fp + fn == 0:
    return None
  precision = tp / (tp + fp) if tp + fp else 0.0
  recall = tp / (tp + fn) if tp + fn else 0.0
  return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def test_accuracy_and_f1_equal_those_computed_by_hand():
  rng = np.random.default_rng(0)
  true = rng.integers(0, 4, 200).tolist()
  predicted = [t if rng.random() < 0.6 and t != 3 else int(rng.integers(0, 3)) for t in true]  # never class 3
  objective = _objective("classification", num_classes=5)  # class 4 neither labelled nor predicted
  confusion = np.zeros((5, 5))
  for t, p in zip(true, predicted):
    confusion[t, p] += 1
  result = objective.summarize({"loss_sum": 20.0, "examples": 200.0, "confusion": confusion})
  by_hand = {k: _f1_by_hand(true, predicted, k) for k in range(5)}
  assert result["accuracy"] == pytest.approx(np.mean(np.array(true) == np.array(predicted)))
  for k in range(4):
    assert result[f"f1_{k}"] == pytest.approx(by_hand[k])
  assert "f1_4" not in result and by_hand[4] is None and by_hand[3] == 0.0
  assert result["macro_f1"] == pytest.approx(np.mean([by_hand[k] for k in range(4)]))
  assert result["loss"] == 0.1 and result["examples"] == 200


def test_classification_eval_sums_count_predictions_at_weighted_positions_only(tiny_config):
  config = tiny_config("llama", {"objective.name": "classification", "objective.num_classes": 3, "data.source": "builtin"})
  objective = objectives.get(config)
  model = Transformer(ml_collections.FrozenConfigDict(config.model), num_classes=3)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 100, (2, 16)), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(16), (2, 16))
  params = nn.unbox(model.init(jax.random.key(0), tokens, None, positions)["params"])
  assert params["classifier"]["kernel"].shape == (config.model.embed_dim, 3)
  weights = jnp.zeros((2, 16)).at[0, 5].set(1.0).at[1, 15].set(1.0)
  targets = jnp.zeros((2, 16), jnp.int32).at[0, 5].set(2).at[1, 15].set(1)
  batch = {"inputs": tokens, "positions": positions, "targets": targets, "weights": weights}
  sums = objective.eval_sums(params, model, batch, None)
  hidden = model.apply({"params": params}, tokens, None, positions, hidden_only=True)
  logits = classification.classifier_logits(params, hidden)
  predicted = [int(jnp.argmax(logits[0, 5])), int(jnp.argmax(logits[1, 15]))]
  expected = np.zeros((3, 3))
  expected[2, predicted[0]] += 1
  expected[1, predicted[1]] += 1
  assert np.array_equal(np.asarray(sums["confusion"]), expected) and float(sums["examples"]) == 2
  log_probs = jax.nn.log_softmax(logits)
  assert float(sums["loss_sum"]) == pytest.approx(-float(log_probs[0, 5, 2] + log_probs[1, 15, 1]), rel=1e-5)


def test_a_reply_is_asked_for_as_the_template_writes_an_assistant_turn():
  plain = CharTokenizer()
  ids, stop = sft.reply_prompt("hi", plain, "plain")
  example = _objective("sft").example({"prompt": "hi", "response": "yo"}, plain, seq_len=64)
  assert ids == [int(i) for i in example.inputs[: len(ids)]] and stop == plain.eos_id
  assert plain.decode(ids) == "### User:\nhi\n### Assistant:\n"
  llama3 = CharTokenizer(sft.LLAMA3_TOKENS)
  ids, stop = sft.reply_prompt("hi", llama3, "llama3")
  example = _objective("sft").example({"prompt": "hi", "response": "yo"}, llama3, seq_len=64)
  assert ids == [int(i) for i in example.inputs[: len(ids)]] and stop == llama3.token_id("<|eot_id|>")
  assert example.weights[len(ids) - 1] == 1 and example.weights[len(ids) - 2] == 0  # the reply starts right after

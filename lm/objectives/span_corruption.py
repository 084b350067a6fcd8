"""Span corruption (T5): the encoder reads text with spans dropped, the decoder writes the dropped spans.

As T5's span_corruption preprocessor does: a window of the token stream (documents joined by EOS)
has objective.noise_density of its tokens dropped, in spans of objective.mean_span_length on average
(the number of spans and of dropped tokens are fixed by the window's length; where they fall is
random). The encoder reads the kept tokens with sentinel k (<extra_id_k>) in place of span k, then
EOS; the decoder writes "<extra_id_0> span 0 <extra_id_1> span 1 ... EOS", reading that shifted
right behind a start token (the tokenizer's <pad>, as T5's, else its BOS). The window is as long as
fits data.seq_len encoder tokens; the decoder's length follows from it (114 for 512, as T5's).

The drop is drawn from (data.seed, the window's index in the run's sequence of windows), so the
rows of step k depend only on (data.seed, k). Evaluation reports the decoder's loss, accuracy (next
token predicted exactly) and perplexity.

Shape letters: B rows, S encoder length (data.seq_len), T decoder length, R window length.
"""

import numpy as np

from lm.config import ConfigError
from lm.objectives import base, causal_lm, mlm

SENTINEL_PIECES = 100  # <extra_id_0> ... <extra_id_99>, as T5's vocabulary holds


def sentinel_piece(k: int) -> str:
  """The piece that stands for dropped span k."""
  return f"<extra_id_{k}>"


def noise_counts(length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
  """(dropped tokens, dropped spans) of a window of `length` tokens: at least one of each, one token kept."""
  num_noise = min(max(round(length * noise_density), 1), length - 1)
  return num_noise, max(round(num_noise / mean_span_length), 1)


def lengths(seq_len: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
  """(window length R, decoder length T): the longest window whose encoder input fits seq_len (T5's
  random_spans_helper), and the decoder length its targets take."""

  def encoder_and_decoder(window: int) -> tuple[int, int]:
    num_noise, num_spans = noise_counts(window, noise_density, mean_span_length)
    return window - num_noise + num_spans + 1, num_noise + num_spans + 1  # sentinels and EOS on both sides

  window = 2
  while encoder_and_decoder(window + 1)[0] <= seq_len:
    window += 1
  return window, encoder_and_decoder(window)[1]


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
  """[num_segments] lengths, each >= 1, adding up to num_items, drawn uniformly."""
  first_in_segment = np.zeros(num_items - 1, bool)
  first_in_segment[: num_segments - 1] = True
  rng.shuffle(first_in_segment)
  segment_of_item = np.cumsum(np.concatenate([[False], first_in_segment]))
  return np.bincount(segment_of_item, minlength=num_segments)


def noise_mask(length: int, noise_density: float, mean_span_length: float, rng: np.random.Generator) -> np.ndarray:
  """[length] bool, True for dropped tokens: spans of kept and dropped tokens alternating, kept first (T5's)."""
  num_noise, num_spans = noise_counts(length, noise_density, mean_span_length)
  num_spans = min(num_spans, num_noise, length - num_noise)
  noise_lengths = _random_segmentation(num_noise, num_spans, rng)
  kept_lengths = _random_segmentation(length - num_noise, num_spans, rng)
  run_lengths = np.stack([kept_lengths, noise_lengths], axis=1).reshape(-1)
  return np.repeat(np.tile([False, True], num_spans), run_lengths)


def corrupt(tokens_R: np.ndarray, is_noise_R: np.ndarray, sentinels: list[int], eos: int) -> tuple[list[int], list[int]]:
  """(encoder input, decoder target): kept tokens with a sentinel per dropped span, then EOS; and each
  span's sentinel followed by its tokens, then EOS."""
  runs = np.split(tokens_R, np.flatnonzero(np.diff(is_noise_R.astype(np.int8))) + 1)  # kept, dropped, kept, ...
  inputs, targets = [], []
  for index, run in enumerate(runs):
    if index % 2 == 0:
      inputs.extend(run.tolist())
    else:
      sentinel = sentinels[index // 2]
      inputs.append(sentinel)
      targets.extend([sentinel] + run.tolist())
  return inputs + [eos], targets + [eos]


def sentinel_ids(tokenizer, needed: int) -> list[int]:
  """The ids of <extra_id_0> .. <extra_id_{needed - 1}>; ConfigError if the tokenizer lacks any."""
  ids = [tokenizer.token_id(sentinel_piece(k)) for k in range(needed)]
  if None in ids:
    raise ConfigError(
        f"data.tokenizer: span corruption of these windows drops {needed} spans, each needing a sentinel, but "
        f"{tokenizer.path} lacks {sentinel_piece(ids.index(None))}. Leave data.tokenizer empty to train one that "
        "reserves them, or shorten data.seq_len"
    )
  return ids


def decoder_start_id(tokenizer) -> int:
  """The token the decoder reads before its first output: <pad> (T5's), else BOS, else EOS."""
  pad = tokenizer.token_id("<pad>")
  if pad is not None:
    return pad
  return tokenizer.bos_id if tokenizer.bos_id >= 0 else tokenizer.eos_id


def decoder_hidden_states(params, model, batch: base.Batch, rng):
  """The decoder's final activations x_BTD (dropout on when `rng` is given)."""
  return model.apply(
      {"params": params},
      batch["encoder_inputs"], batch["encoder_segment_ids"], batch["encoder_positions"],
      batch["inputs"], batch["segment_ids"], batch["positions"],
      deterministic=rng is None,
      hidden_only=True,
      rngs={"dropout": rng} if rng is not None else {},
  )  # fmt: skip


class SpanCorruption(base.Objective):
  """T5's span corruption on plain text."""

  name = "span_corruption"
  reads_examples = False

  def __init__(self, config, seq_len: int):
    super().__init__(config)
    self.seq_len = seq_len  # data.seq_len: the encoder's length, which sizes the windows

  def _lengths(self, seq_len: int) -> tuple[int, int]:
    return lengths(seq_len, self.config.noise_density, self.config.mean_span_length)

  def reserved_pieces(self):
    return [sentinel_piece(k) for k in range(SENTINEL_PIECES)]

  def check_tokenizer(self, tokenizer, seq_len):
    window, _ = self._lengths(seq_len)
    sentinel_ids(tokenizer, noise_counts(window, self.config.noise_density, self.config.mean_span_length)[1])

  def stream_stride(self, seq_len):
    return self._lengths(seq_len)[0] - 1  # windows of R tokens

  def batch_lengths(self, seq_len):
    decoder_length = self._lengths(seq_len)[1]
    encoder = {f"encoder_{name}": seq_len for name in ("inputs", "segment_ids", "positions")}
    return {**encoder, **{name: decoder_length for name in ("inputs", "targets", "positions", "segment_ids", "weights")}}

  def rows_from_stream(self, tokens_BR, window_indices_B, tokenizer, seed):
    rows, window = tokens_BR.shape
    num_spans = noise_counts(window, self.config.noise_density, self.config.mean_span_length)[1]
    sentinels = sentinel_ids(tokenizer, num_spans)
    encoder_length, decoder_length = self.seq_len, self._lengths(self.seq_len)[1]
    batch = {name: np.zeros((rows, encoder_length), np.int32) for name in ("encoder_inputs", "encoder_segment_ids", "encoder_positions")}
    targets_BT = np.zeros((rows, decoder_length), np.int32)
    for row, window_index in enumerate(window_indices_B):
      rng = np.random.default_rng([*seed, int(window_index)])
      is_noise_R = noise_mask(window, self.config.noise_density, self.config.mean_span_length, rng)
      inputs, targets = corrupt(tokens_BR[row], is_noise_R, sentinels, tokenizer.eos_id)
      batch["encoder_inputs"][row, : len(inputs)] = inputs
      batch["encoder_segment_ids"][row, : len(inputs)] = 1
      batch["encoder_positions"][row, : len(inputs)] = np.arange(len(inputs))
      targets_BT[row] = targets  # always decoder_length tokens: the counts are fixed by the window's length
    start_B1 = np.full((rows, 1), decoder_start_id(tokenizer), np.int32)
    batch["inputs"] = np.concatenate([start_B1, targets_BT[:, :-1]], axis=1)
    batch["targets"] = targets_BT
    batch["weights"] = np.ones((rows, decoder_length), np.float32)
    batch["segment_ids"] = np.ones((rows, decoder_length), np.int32)
    batch["positions"] = np.broadcast_to(np.arange(decoder_length, dtype=np.int32), (rows, decoder_length)).copy()
    return batch

  def loss_sums(self, params, model, batch, rng, z_loss_weight):
    hidden_BTD = decoder_hidden_states(params, model, batch, rng)
    return base.with_router_loss(causal_lm.weighted_loss_sums(model, params, hidden_BTD, batch, z_loss_weight), {}, model)

  def eval_sums(self, params, model, batch, byte_lengths_V):
    """Weighted cross-entropy, correct predictions and target tokens of the decoder."""
    del byte_lengths_V
    return mlm.prediction_sums(model, params, decoder_hidden_states(params, model, batch, None), batch)

  def summarize(self, sums):
    """Loss (nats per target token), accuracy and perplexity of the decoder's targets."""
    return mlm.summarize_predictions(sums)

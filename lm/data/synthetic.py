"""A deterministic token stream that a model can learn, for tests and benchmarks (no files needed).

Each row counts up from a random start by a random stride of 1 to 4 (mod vocab_size): the first
token is a guess, the second narrows the stride, after that every token is predictable.
"""

import numpy as np

MAX_STRIDE = 4


def rows(seed: int, step: int, global_batch: int, row_indices: np.ndarray, seq_len: int, vocab_size: int) -> dict[str, np.ndarray]:
  """The rows `row_indices` of the global batch at `step`; a pure function of (seed, step).

  Each row is one document, so the batch has no segment_ids: attention needs no document mask.
  """
  rng = np.random.default_rng([seed, step])
  starts_B = rng.integers(0, vocab_size, size=global_batch)[row_indices]
  strides_B = rng.integers(1, MAX_STRIDE + 1, size=global_batch)[row_indices]
  tokens_BT = (starts_B[:, None] + strides_B[:, None] * np.arange(seq_len + 1)) % vocab_size
  tokens_BT = tokens_BT.astype(np.int32)
  num_rows = tokens_BT.shape[0]
  return {
      "inputs": tokens_BT[:, :-1],
      "targets": tokens_BT[:, 1:],
      "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (num_rows, seq_len)).copy(),
      "weights": np.ones((num_rows, seq_len), np.float32),
  }

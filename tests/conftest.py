"""Every test sees 8 simulated CPU devices, so sharded code runs on any machine.

Shared fixtures: `tiny_config` (a two-layer model on synthetic data), `corpus_dir` (a folder of
small text documents), `text_config` (the tiny model on that folder) and `trained_run` (a short
run of it, with checkpoints).
"""

import os
import tempfile

# Backend optimization level 0 halves CPU compile times; the tests are dominated by compiling
# tiny models, and every comparison they make runs under the same flags. On 2 busy cores the 8
# simulated devices can take longer than XLA's default 40 s to meet at a collective, which would
# abort the process: they get 10 minutes.
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + (
    " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    " --xla_cpu_collective_call_terminate_timeout_seconds=600 --xla_cpu_collective_timeout_seconds=600"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests start `python -m lm.train` (or several processes of it) that compile the same programs;
# a compilation cache shared by the whole session lets each program compile once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="lm-tests-jax-cache-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402  (must come after XLA_FLAGS)
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from lm.config import load_config_file  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session", autouse=True)
def eight_devices():
  assert jax.device_count() == 8, "XLA_FLAGS was set too late: jax was imported before tests/conftest.py"


def tiny(family: str = "llama", overrides: dict | None = None) -> ml_collections.ConfigDict:
  """A two-layer float32 model on synthetic data; `overrides` maps "section.field" to a value."""
  config = load_config_file(os.path.join(REPO, "configs", "quickstart.py"))
  config.model.family = family
  config.model.num_layers = 2
  config.model.embed_dim = 32
  config.model.num_heads = 4
  config.model.num_kv_heads = 2
  config.model.mlp_dim = 64
  config.data.source = "synthetic"
  config.model.vocab_size = 128
  config.model.max_seq_len = 64
  config.model.dtype = "float32"
  config.data.seq_len = 16
  config.model.loss_chunk_len = 4  # 4 chunks of the 16 positions: every test runs the chunked loss
  config.data.batch_size = 8
  config.train.steps = 10
  config.optimizer.warmup_steps = 2
  for path, value in (overrides or {}).items():
    section, field = path.split(".")
    config[section][field] = value
  return config


@pytest.fixture(scope="session")
def tiny_config():
  """The `tiny` config factory."""
  return tiny


WORDS = "the model reads every token of data once per epoch while loss falls and batches stay exact".split()


def make_document(rng: np.random.Generator, index: int) -> str:
  """A few lines of words and numbers, distinct for each index."""
  lines = [f"# document {index}"]
  for _ in range(int(rng.integers(3, 25))):
    words = rng.choice(WORDS, size=int(rng.integers(2, 12)))
    lines.append(" ".join(words) + f" = {int(rng.integers(0, 1000))}")
  return "\n".join(lines) + "\n"


LLAMA3_SPECIAL_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
# Llama 3's tokenizer.json splits text with this before its byte-level BPE.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def train_byte_level_bpe(folder, documents: list[str], vocab_size: int = 400, style: str = "llama3") -> str:
  """Saves a byte-level BPE trained on `documents` as FOLDER/tokenizer.json; returns its path.

  "llama3": Llama 3's layout (a Split pre-tokenizer, ByteLevel without its regex, a post-processor that
  adds BOS) and its special tokens, with a tokenizer_config.json naming BOS and EOS. "gpt2": GPT-2's
  (ByteLevel with its regex, <|endoftext|>, no tokenizer_config.json).
  """
  import json

  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

  tokenizer = Tokenizer(models.BPE())
  if style == "llama3":
    special_tokens = list(LLAMA3_SPECIAL_TOKENS)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])  # fmt: skip
  else:
    special_tokens = ["<|endoftext|>"]
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=special_tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False,
  )  # fmt: skip
  tokenizer.train_from_iterator(documents, trainer=trainer)
  if style == "llama3":
    bos = "<|begin_of_text|>"
    tokenizer.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, 0)])
    config = {"bos_token": bos, "eos_token": "<|end_of_text|>", "tokenizer_class": "PreTrainedTokenizerFast"}
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
      json.dump(config, f)
  path = os.path.join(folder, "tokenizer.json")
  tokenizer.save(path)
  return path


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
  """60 plain-text documents in .txt, .md and .py files, in nested folders."""
  root = tmp_path_factory.mktemp("corpus")
  rng = np.random.default_rng(0)
  for index in range(60):
    folder = root / f"part{index % 3}"
    folder.mkdir(exist_ok=True)
    (folder / f"doc{index}{['.txt', '.md', '.py'][index % 3]}").write_text(make_document(rng, index))
  return root


@pytest.fixture(scope="session")
def text_config(tiny_config, corpus_dir, tmp_path_factory):
  """The tiny config on the corpus, with a 320-piece tokenizer built under a fresh data_dir."""
  data_dir = tmp_path_factory.mktemp("data")

  def make(overrides: dict | None = None):
    return tiny_config(
        "llama",
        {
            "data.source": f"text:{corpus_dir}",
            "data.data_dir": str(data_dir),
            "model.vocab_size": 0,  # from the tokenizer
            "data.tokenizer_vocab_size": 320,
            "data.validation_fraction": 0.2,
            "data.seq_len": 32,
            **(overrides or {}),
        },
    )

  return make


@pytest.fixture(scope="session")
def trained_run(text_config, tmp_path_factory):
  """(config, workdir) of a 6-step run on the corpus, over 8 devices, with checkpoints at steps 3 and 6."""
  from lm.train import loop

  config = text_config({"train.steps": 6, "train.log_every": 1, "checkpoint.every": 3, "eval.every": 3, "eval.steps": 2})
  workdir = str(tmp_path_factory.mktemp("trained_run"))
  loop.train(config, workdir)
  return config, workdir


# Started first, so that the two workers do not finish one of these alone at the end.
LONGEST_TESTS = (
    "test_shipped_config_fits_where_its_docstring_says",  # compiles Llama 8B and 1B for TPU slices
    "test_kill_9_at_any_moment_then_rerun_equals_the_uninterrupted_run",
    "test_two_processes_equal_one_and_checkpoints_cross_between_them",
    "test_quickstart_cli_trains_on_the_builtin_corpus_and_writes_the_workdir",
    "test_a_checkpoint_restores_onto_another_mesh",
    "test_kill_9_and_rerun_equals_the_uninterrupted_run",
)


def pytest_collection_modifyitems(items):
  items.sort(key=lambda item: not any(name in item.nodeid for name in LONGEST_TESTS))

"""What a run does under misuse and faults: it never saves NaN, says when it has collapsed, trains in
every documented dtype, and keeps the checkpoints it had."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import checkpoints as checkpoints_lib
from lm.train import checkpoint, loop, state as state_lib


def _losses(workdir) -> list[float]:
  import json
  import os

  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line)["loss"] for line in f]


def test_parameters_that_become_infinite_are_never_saved(tiny_config, tmp_path):
  """float16 weights that a learning rate pushes past 65504 become Inf: the run stops at the next save,
  which it refuses, and the checkpoints from before are the ones that remain."""
  settings = {"mesh.data": 8, "checkpoint.every": 2, "eval.every": 0, "model.param_dtype": "float16"}
  good = tiny_config("llama", {**settings, "train.steps": 4})
  loop.train(good, str(tmp_path))
  overflowing = tiny_config("llama", {
      **settings, "train.steps": 8, "optimizer.learning_rate": 1e6, "optimizer.warmup_steps": 0,
      "optimizer.schedule": "constant",
  })  # fmt: skip
  with pytest.raises(loop.TrainingError, match="hold NaN or Inf, so they were not saved; the last checkpoint, step 4"):
    loop.train(overflowing, str(tmp_path))
  checkpoints = checkpoint.manager(str(tmp_path), good.checkpoint)
  assert checkpoints.all_steps() == [2, 4]
  run = loop.setup(good)
  assert state_lib.is_finite(checkpoint.restore_latest(checkpoints, run.abstract_state).state)


def test_a_collapsed_model_is_reported(tiny_config, tmp_path, capsys):
  config = tiny_config("llama", {
      "mesh.data": 8, "train.steps": 6, "train.log_every": 1, "eval.every": 0, "optimizer.learning_rate": 1e4,
      "optimizer.warmup_steps": 1,
  })  # fmt: skip
  loop.train(config, str(tmp_path))
  assert "the model has collapsed to a uniform distribution" in capsys.readouterr().out
  assert _losses(tmp_path)[-1] == pytest.approx(np.log(config.model.vocab_size), rel=1e-4)


def test_a_learning_model_is_not_reported_as_collapsed(tiny_config, tmp_path, capsys):
  loop.train(tiny_config("llama", {"mesh.data": 8, "train.steps": 6, "train.log_every": 1, "eval.every": 0}), str(tmp_path))
  assert "collapsed" not in capsys.readouterr().out


@pytest.mark.parametrize("param_dtype, dtype", [("bfloat16", "float32"), ("float16", "float32"), ("float32", "float16")])
def test_documented_dtypes_train(tiny_config, tmp_path, param_dtype, dtype):
  config = tiny_config("llama", {
      "mesh.data": 2, "mesh.fsdp": 4, "train.steps": 8, "train.log_every": 1, "eval.every": 0,
      "model.param_dtype": param_dtype, "model.dtype": dtype,
  })  # fmt: skip
  loop.train(config, str(tmp_path))
  losses = _losses(tmp_path)
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.1
  restored = checkpoint.restore_latest(checkpoint.manager(str(tmp_path), config.checkpoint), loop.setup(config).abstract_state)
  assert {leaf.dtype for leaf in jax.tree.leaves(restored.state.params)} == {jnp.dtype(param_dtype)}
  assert {leaf.dtype for leaf in jax.tree.leaves(restored.state.opt_state) if leaf.ndim} == {jnp.dtype("float32")}


def test_resuming_with_another_optimizer_structure_is_a_one_line_error(tiny_config, tmp_path):
  from lm.config import UserError

  loop.train(tiny_config("llama", {"mesh.data": 8, "train.steps": 2, "eval.every": 0}), str(tmp_path))
  unclipped = tiny_config("llama", {"mesh.data": 8, "train.steps": 4, "eval.every": 0, "optimizer.grad_clip_norm": 0.0})
  with pytest.raises(UserError, match="holds the optimizer state of another optimizer") as error:
    loop.train(unclipped, str(tmp_path))
  assert "\n" not in str(error.value)


def _data_files(step_dir) -> list[str]:
  """The files that hold the state's arrays (Orbax may keep a copy that a restore does not read)."""
  files = [os.path.join(d, name) for d, _, names in os.walk(step_dir / "state") for name in names]
  return [path for path in files if os.path.getsize(path) > 1024]


def _flip_a_bit(path):
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)
    f.seek(-1, 1)
    f.write(bytes([byte[0] ^ 0x10]))


def _truncate(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _delete(path):
  os.remove(path)


def _damaged_run(tiny_config, tmp_path, harm, with_digests: bool):
  """A 4-step run with checkpoints at 2 and 4, then `harm` done to every data file of step 4."""
  config = tiny_config("llama", {"mesh.data": 8, "train.steps": 4, "checkpoint.every": 2, "eval.every": 0})
  loop.train(config, str(tmp_path))
  step_dir = tmp_path / "checkpoints" / "4"
  assert (step_dir / checkpoints_lib.DIGESTS_FILE).exists()
  if not with_digests:  # as a run killed right after its save, or saved by an older lm, leaves it
    os.remove(step_dir / checkpoints_lib.DIGESTS_FILE)
  for path in _data_files(step_dir):
    harm(path)
  return config


@pytest.mark.parametrize("harm", [_flip_a_bit, _truncate, _delete], ids=["bit_flipped", "truncated", "deleted"])
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_one_before_restored(tiny_config, tmp_path, capsys, harm):
  config = _damaged_run(tiny_config, tmp_path, harm, with_digests=True)
  checkpoints = checkpoint.manager(str(tmp_path), config.checkpoint)
  restored = checkpoint.restore_latest(checkpoints, loop.setup(config).abstract_state)
  assert restored.step == 2
  out = capsys.readouterr().out
  assert "Warning: checkpoint step 4 is damaged (" in out and "it is set aside as" in out
  assert checkpoints.all_steps() == [2] and any(name.startswith("damaged-4-") for name in os.listdir(tmp_path / "checkpoints"))

  loop.train(tiny_config("llama", {"mesh.data": 8, "train.steps": 6, "checkpoint.every": 2, "eval.every": 0}), str(tmp_path))
  assert checkpoint.manager(str(tmp_path), config.checkpoint).all_steps() == [2, 4, 6]  # step 4 saved again


@pytest.mark.parametrize("harm", [_truncate, _delete], ids=["truncated", "deleted"])
def test_an_unreadable_step_without_digests_is_named_with_what_to_do(tiny_config, tmp_path, harm):
  """Without digests to prove damage, a read error may come from elsewhere: the step is named, not moved."""
  from lm.config import UserError

  config = _damaged_run(tiny_config, tmp_path, harm, with_digests=False)
  checkpoints = checkpoint.manager(str(tmp_path), config.checkpoint)
  abstract = loop.setup(config).abstract_state
  with pytest.raises(UserError, match=r"checkpoint step 4 in .* cannot be read \(.*\)\. If the cause is not this machine "
                     r"\(memory, permissions, storage\), the step is damaged: move .*/4 away to resume from step 2"):
    checkpoint.restore_latest(checkpoints, abstract)
  assert (tmp_path / "checkpoints" / "4").is_dir()  # left where it was
  os.rename(tmp_path / "checkpoints" / "4", tmp_path / "elsewhere")
  assert checkpoint.restore_latest(checkpoint.manager(str(tmp_path), config.checkpoint), abstract).step == 2


def test_a_restore_that_fails_for_another_reason_moves_nothing(tiny_config, tmp_path, monkeypatch):
  from lm.config import UserError

  config = tiny_config("llama", {"mesh.data": 8, "train.steps": 2, "checkpoint.every": 1, "eval.every": 0})
  loop.train(config, str(tmp_path))
  checkpoints = checkpoint.manager(str(tmp_path), config.checkpoint)
  monkeypatch.setattr(checkpoints, "restore", lambda *args, **kwargs: (_ for _ in ()).throw(MemoryError("out of host memory")))
  with pytest.raises(UserError, match=r"checkpoint step 2 .* cannot be read \(out of host memory\)"):
    checkpoint.restore_latest(checkpoints, loop.setup(config).abstract_state)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]


def test_when_every_checkpoint_is_damaged_it_says_so_and_does_not_start_over(tiny_config, tmp_path):
  from lm.config import UserError

  config = tiny_config("llama", {"mesh.data": 8, "train.steps": 2, "checkpoint.every": 1, "eval.every": 0})
  loop.train(config, str(tmp_path))
  for step in (1, 2):
    for path in _data_files(tmp_path / "checkpoints" / str(step)):
      _flip_a_bit(path)
  for _ in range(2):  # the second time too: it must not train from step 0 over the old run
    with pytest.raises(UserError, match=r"holds only damaged checkpoints \(damaged-1-.*, damaged-2-.*\): start a new"):
      loop.train(config, str(tmp_path))


def test_digests_that_cannot_be_written_leave_the_step_unverified_not_damaged(tiny_config, tmp_path, monkeypatch, capsys):
  import errno
  import json

  config = tiny_config("llama", {"mesh.data": 8, "train.steps": 2, "checkpoint.every": 2, "eval.every": 0})
  real_dump = json.dump

  def disk_full(obj, f, *args, **kwargs):
    if f.name.endswith(f".partial-{os.getpid()}") and checkpoints_lib.DIGESTS_FILE in f.name:
      raise OSError(errno.ENOSPC, "No space left on device")
    return real_dump(obj, f, *args, **kwargs)

  monkeypatch.setattr(checkpoint.json, "dump", disk_full)
  loop.train(config, str(tmp_path))
  assert "Warning: no digests for checkpoint step 2 ([Errno 28] No space left on device)" in capsys.readouterr().out
  assert os.listdir(tmp_path / "checkpoints" / "2").count(checkpoints_lib.DIGESTS_FILE) == 0
  assert not [name for name in os.listdir(tmp_path / "checkpoints" / "2") if ".partial" in name]
  monkeypatch.undo()
  checkpoints = checkpoint.manager(str(tmp_path), config.checkpoint)
  checkpoints_lib.write_digests(checkpoints)  # space again: written now, of the checkpoint's own files only
  assert checkpoints_lib.damage(checkpoints, 2) is None and (tmp_path / "checkpoints" / "2" / checkpoints_lib.DIGESTS_FILE).exists()


def test_loading_a_damaged_checkpoint_names_it(trained_run, tmp_path):
  import shutil

  import lm
  from lm.config import UserError

  workdir = tmp_path / "run"
  shutil.copytree(trained_run[1], workdir)
  for path in _data_files(workdir / "checkpoints" / "6"):
    _flip_a_bit(path)
  with pytest.raises(UserError, match=r"checkpoint step 6 in .* is damaged \(.* has changed since it was saved\); kept steps: \[3\]"):
    lm.load(str(workdir))
  assert lm.load(str(workdir), step=3).step == 3


@pytest.mark.parametrize("async_save", [True, False])
def test_a_save_that_fails_stops_the_run_in_one_line_keeping_the_checkpoint_before(tmp_path, async_save):
  """Storage that refuses to grow (here: a file size limit, as a full disk would) at the save of step 4."""
  import resource
  import signal
  import subprocess
  import sys

  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  command = [
      sys.executable, "-m", "lm.train", "--config=configs/quickstart.py", f"--workdir={tmp_path}",
      "--config.data.source=synthetic", "--config.model.num_layers=1", "--config.data.seq_len=16",
      "--config.data.batch_size=8", "--config.optimizer.warmup_steps=1", "--config.checkpoint.every=2",
      f"--config.checkpoint.async_save={async_save}",
  ]  # fmt: skip
  env = {name: value for name, value in os.environ.items() if not name.startswith("JAX_COMPILATION_CACHE")}
  subprocess.run([*command, "--config.train.steps=2"], cwd=repo, env=env, check=True, capture_output=True, timeout=900)

  def small_files_only():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writing past the limit fails (EFBIG) instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

  failed = subprocess.run([*command, "--config.train.steps=8"], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=900, preexec_fn=small_files_only)  # fmt: skip
  assert failed.returncode == 1, failed.stderr
  assert len(failed.stderr.strip().splitlines()) == 1, failed.stderr
  (line,) = failed.stderr.strip().splitlines()
  assert line.startswith(f"error: saving step 4 in {tmp_path / 'checkpoints'} failed (") and "step 2 is intact" in line

  resumed = subprocess.run([*command, "--config.train.steps=4"], cwd=repo, env=env, capture_output=True, text=True, timeout=900)
  assert resumed.returncode == 0, resumed.stderr
  assert "Resuming from step 2" in resumed.stdout

"""train.profile_steps: a jax.profiler trace of a few steps lands where TensorBoard's profile tab reads it."""

import glob
import os

from lm.train import loop


def test_profile_of_a_few_steps_is_written_to_tensorboard(tiny_config, tmp_path, capsys):
  config = tiny_config("llama", {"mesh.data": 8, "train.steps": 5, "train.profile_steps": 2, "eval.every": 0})
  loop.train(config, str(tmp_path))
  traces = glob.glob(os.path.join(tmp_path, "tensorboard", "plugins", "profile", "*", "*.xplane.pb"))
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 0
  assert "Profiled steps 2 to 3" in capsys.readouterr().out


def test_no_profile_by_default(tiny_config, tmp_path):
  loop.train(tiny_config("llama", {"mesh.data": 8, "train.steps": 3, "eval.every": 0}), str(tmp_path))
  assert not os.path.exists(os.path.join(tmp_path, "tensorboard", "plugins"))


def test_a_run_that_ends_inside_the_window_says_which_steps_it_traced(tiny_config, tmp_path, capsys):
  config = tiny_config("llama", {"mesh.data": 8, "train.steps": 3, "train.profile_steps": 5, "eval.every": 0})
  loop.train(config, str(tmp_path))
  assert "Profiled steps 2 to 3:" in capsys.readouterr().out
  assert glob.glob(os.path.join(tmp_path, "tensorboard", "plugins", "profile", "*", "*.xplane.pb"))

"""notebooks/evaluate_checkpoint.ipynb runs top to bottom, headless, against a short run."""

import os

import nbclient
import nbformat

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOTEBOOK = os.path.join(REPO, "notebooks", "evaluate_checkpoint.ipynb")


def test_notebook_is_committed_without_outputs():
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  assert all(not cell.get("outputs") and cell.get("execution_count") is None for cell in notebook.cells if cell.cell_type == "code")


def test_notebook_executes_on_a_run(trained_run, monkeypatch):
  _, workdir = trained_run
  monkeypatch.setenv("LM_WORKDIR", workdir)
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")  # a 1-device kernel, like a laptop
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": REPO}}).execute()
  outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
  assert not [output for output in outputs if output.output_type == "error"]
  images = [output for output in outputs if "image/png" in output.get("data", {})]
  assert len(images) == 2  # loss curves; learning rate and throughput
  text = "".join(output.get("text", "") for output in outputs)
  assert f"latest step 6, checkpoints kept [3, 6]" in text
  tables = [output["data"]["text/markdown"] for output in outputs if "text/markdown" in output.get("data", {})]
  assert tables and "| 3 |" in tables[0] and "| 6 |" in tables[0]
  assert any("text/html" in output.get("data", {}) for output in outputs)

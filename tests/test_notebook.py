"""notebooks/quickstart.ipynb runs top to bottom on a CPU and is committed without outputs; the plotting
scripts write their PNGs.

The notebook loads the real Gemma-3 270M from the default user cache (converted there on first use, so a
run from scratch works too), hence the real_270m group: one xdist worker converts it. Its kernel runs with
tests/torchless on PYTHONPATH, so torch and transformers cannot be imported there, as for a user who never
installed them."""

import os
import subprocess
import sys
import time
from pathlib import Path

import nbclient
import nbformat
import pytest

pytestmark = pytest.mark.xdist_group("real_270m")

ROOT = Path(__file__).resolve().parent.parent
TORCHLESS = ROOT / "tests" / "torchless"
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"
PNG = b"\x89PNG\r\n\x1a\n"


def test_notebook_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"cell {i} has outputs: strip them"


def test_notebook_runs_top_to_bottom(monkeypatch):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # The kernel inherits this environment: no torch or transformers in it, which a last cell confirms.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(TORCHLESS), os.environ.get("PYTHONPATH")])))
    nb.cells.append(nbformat.v4.new_code_cell(
        "import importlib.util\n"
        "print('torch or transformers in the kernel:', [m for m in ('torch', 'transformers')\n"
        "      if m in sys.modules or importlib.util.find_spec(m) is not None])"))
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    )
    t = time.perf_counter()
    client.execute()  # raises CellExecutionError (naming the cell and the traceback) on any error
    print(f"\nnotebook ran in {time.perf_counter() - t:.0f} s")
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert " Berlin" in text  # greedy 270M continuation of "... The capital of Germany is"
    assert "image 1: input_ids[" in text
    assert text.count("||kernel - ref|| / ||ref||") == 2
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2  # mask and benchmark figures
    assert "torch or transformers in the kernel: []" in text


@pytest.mark.parametrize("script", ["plot_mask.py", "plot_benchmarks.py"])
def test_plot_script_writes_png(script, tmp_path):
    out = tmp_path / "sub" / "fig.png"
    subprocess.run([sys.executable, str(ROOT / "scripts" / script), "--out", str(out)], check=True, cwd=tmp_path)
    assert out.read_bytes()[:8] == PNG and out.stat().st_size > 10_000

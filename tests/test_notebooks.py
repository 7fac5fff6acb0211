"""The course: every notebook in notebooks/ runs top to bottom, its own checks included.

Each notebook asserts what it shows (the cache is faster than recomputing, the parallel logits
equal one device's, ...), so a notebook that runs is a notebook whose lesson still holds.
They run as notebooks/execute.py runs them, in a fresh kernel, without rewriting the files.
"""

import sys
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
sys.path.insert(0, str(NOTEBOOKS))

from execute import notebooks, run  # noqa: E402


def test_the_course_has_its_notebooks():
    assert len(notebooks()) >= 12


@pytest.mark.parametrize("path", notebooks(), ids=lambda path: path.stem)
def test_the_notebook_runs_top_to_bottom(path):
    run(path, write=False)


@pytest.mark.parametrize("path", notebooks(), ids=lambda path: path.stem)
def test_the_notebook_is_stored_with_its_outputs_and_a_figure(path):
    import nbformat

    notebook = nbformat.read(path, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(cell.get("execution_count") for cell in code), "run notebooks/execute.py to store its outputs"
    figures = [output for cell in code for output in cell.get("outputs", []) if "image/png" in output.get("data", {})]
    assert figures, "each notebook draws at least one figure"
    assert "widgets" not in notebook.metadata

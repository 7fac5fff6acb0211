"""The documentation site: `mkdocs build --strict` passes, and the pages it promises are in it.

Strict mode fails on any warning: a broken link or anchor in a page or a notebook, a nav entry
without its page, a docstring mkdocstrings cannot read. The notebooks are rendered as stored,
never executed (tests/test_notebooks.py runs them).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

# the site's packages are in the dev extra: without them this file fails here (not skips)
import material  # noqa: F401
import mkdocs  # noqa: F401
import mkdocs_jupyter  # noqa: F401
import mkdocstrings_handlers.python  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]-*.ipynb"))


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    site_dir = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(site_dir)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    return site_dir


def page(site: Path, path: str) -> str:
    file = site / path / "index.html"
    assert file.is_file(), f"the site has no page {path or '(home)'}/"
    return file.read_text(encoding="utf-8")


def test_the_site_builds_in_strict_mode(site):
    assert "tinyinfer" in page(site, "")


@pytest.mark.parametrize("path", ["install", "quickstart", "ways-in", "architecture", "engine", "serving",
                                  "parallelism", "benchmarks", "glossary", "reference/ops", "course"])
def test_the_site_has_the_page(site, path):
    page(site, path)


def test_the_op_reference_is_generated_from_the_backends_docstrings(site):
    html = page(site, "reference/ops")
    assert "One weight matrix serves every token of the batch" in html  # NumpyBackend.matmul
    assert 'id="kernels.numba_backend.NumbaBackend"' in html
    assert 'id="kernels.cupy_backend.CupyBackend"' in html  # documented without CuPy installed
    assert 'id="tinyinfer.ops.cost.OpCost"' in html


def test_the_engine_page_documents_its_classes(site):
    html = page(site, "engine")
    for name in ("engine.LLMEngine", "scheduler.Scheduler", "block_manager.BlockManager", "paged_cache.PagedBatch"):
        assert f'id="tinyinfer.engine.{name}"' in html


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda path: path.stem)
def test_every_notebook_is_a_page_of_the_course(site, notebook):
    html = page(site, f"course/{notebook.stem}")
    assert "jupyter-wrapper" in html  # rendered by mkdocs-jupyter, not copied as a file
    assert (site / "course" / notebook.stem / notebook.name).is_file()  # the download beside it
    assert f'href="{notebook.stem}/"' in page(site, "course")  # listed in the course's nav

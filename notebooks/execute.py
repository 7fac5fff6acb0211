"""Run the course's notebooks top to bottom and store them with their outputs.

    python3 notebooks/execute.py                 # every notebook, in place, with a timing table
    python3 notebooks/execute.py 05-kv-cache     # the ones whose names start so

The notebooks live in the repository with their outputs, so they read on GitHub with their
plots; this is how those outputs are made (and remade after a change). Each runs in a fresh
kernel from the notebooks/ folder (nbclient), the way tests/test_notebooks.py runs them in CI;
its widget state is dropped and its figures are the PNGs matplotlib's inline backend draws.
"""

import argparse
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
CELL_TIMEOUT = 600  # seconds: a cold Numba compile in the first cell that needs it


def notebooks(prefixes=()) -> list[Path]:
    found = sorted(HERE.glob("[0-9][0-9]-*.ipynb"))
    return [path for path in found if not prefixes or path.name.startswith(tuple(prefixes))]


def run(path: Path, write: bool) -> float:
    """Execute one notebook in a fresh kernel; store it with its outputs when `write`.
    Returns the seconds it took; raises on the first cell that fails."""
    notebook = nbformat.read(path, as_version=4)
    notebook.metadata.pop("widgets", None)
    start = time.perf_counter()
    NotebookClient(notebook, timeout=CELL_TIMEOUT, kernel_name="python3",
                   resources={"metadata": {"path": str(HERE)}}).execute()
    seconds = time.perf_counter() - start
    if write:
        nbformat.write(notebook, path)
    return seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="run only the notebooks whose names start with these")
    parser.add_argument("--check", action="store_true", help="run them but leave the files as they are")
    args = parser.parse_args()
    print("| notebook | seconds |")
    print("| --- | ---: |")
    total = 0.0
    for path in notebooks(args.names):
        seconds = run(path, write=not args.check)
        total += seconds
        print(f"| {path.name} | {seconds:.1f} |", flush=True)
    print(f"| all | {total:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

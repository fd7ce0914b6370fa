"""The tutorial notebooks: committed without outputs, and executed end to end on tiny settings."""

from __future__ import annotations

import re

import nbformat
import pytest

from conftest import REPO_ROOT

NOTEBOOK_DIR = REPO_ROOT / "notebooks"
NOTEBOOKS = ["01_data_prep.ipynb", "02_tokenizer.ipynb", "03_pretraining.ipynb"]


def _stdout(nb) -> str:
    """All text the executed notebook printed to stdout."""
    return "".join(
        output.get("text", "")
        for cell in nb.cells if cell.cell_type == "code"
        for output in cell.get("outputs", []) if output.get("output_type") == "stream" and output.get("name") == "stdout"
    )


def _check_01(text: str) -> None:
    train, validation = map(int, re.search(r"corpus OK: (\d+) train \+ (\d+) validation documents", text).groups())
    assert train > validation > 0


def _check_02(text: str) -> None:
    match = re.search(r"tokenizer OK: exact round trips; BPE bytes/token ([\d.]+) < ([\d.]+) < ([\d.]+)", text)
    small, medium, large = map(float, match.groups())
    assert 1.0 < small < medium < large
    covered, total = map(int, re.search(r"assistant mask covers (\d+)/(\d+) tokens", text).groups())
    assert 0 < covered < total


def _check_03(text: str) -> None:
    match = re.search(r"training OK: last train loss ([\d.]+) < first logged ([\d.]+); "
                      r"validation loss ([\d.]+) -> ([\d.]+)", text)
    last, first, init_eval, final_eval = map(float, match.groups())
    assert last < first and final_eval < init_eval
    assert re.search(r"MFU = .* = [\d.]+%", text)


CHECKS = {"01_data_prep.ipynb": _check_01, "02_tokenizer.ipynb": _check_02, "03_pretraining.ipynb": _check_03}


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_has_no_outputs(name):
    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code, f"{name} has no code cells"
    for index, cell in enumerate(code):
        assert cell.get("outputs") == [], f"{name}: code cell {index} has committed outputs"
        assert cell.get("execution_count") is None, f"{name}: code cell {index} has an execution count"


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_executes(name):
    from nbclient import NotebookClient

    # Read into memory and execute that copy; the file on disk is never written.
    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    client.execute()  # raises CellExecutionError, with the cell and traceback, if any cell fails
    errors = [out for cell in nb.cells for out in cell.get("outputs", []) if out.get("output_type") == "error"]
    assert not errors
    CHECKS[name](_stdout(nb))

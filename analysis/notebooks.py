"""Executing the jupytext notebooks (analysis/nb_*.py) with parameters, papermill-style, through nbclient.

The notebook's cell tagged `parameters` holds the defaults; `execute` inserts a cell right after it that
assigns the given values (tagged `injected-parameters`, as papermill does), so a notebook runs unchanged both
interactively and here.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import jupytext
import nbformat
from nbclient import NotebookClient

ANALYSIS_DIR = Path(__file__).resolve().parent
REPO_ROOT = ANALYSIS_DIR.parent
KERNEL = "python3"


def notebook_paths() -> list[Path]:
    """Every analysis notebook, in a stable order."""
    return sorted(ANALYSIS_DIR.glob("nb_*.py"))


def ensure_kernel() -> None:
    """Make the `python3` kernel resolvable. A fresh venv normally ships ipykernel's spec; where it does not
    (e.g. `--no-deps` installs), install it into this interpreter's prefix so the kernel runs *this* Python."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec(KERNEL)
    except NoSuchKernel:
        from ipykernel.kernelspec import install

        install(prefix=sys.prefix)


def inject_parameters(nb: nbformat.NotebookNode, parameters: dict[str, Any]) -> nbformat.NotebookNode:
    """Insert a cell assigning `parameters` after the cell tagged `parameters` (at the top if none)."""
    if not parameters:
        return nb
    source = "# Injected parameters\n" + "\n".join(f"{k} = {v!r}" for k, v in parameters.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    index = next(
        (i + 1 for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])), 0
    )
    nb.cells.insert(index, cell)
    return nb


def execute(
    path: str | Path,
    parameters: dict[str, Any] | None = None,
    output: str | Path | None = None,
    timeout: int = 300,
    cwd: str | Path = REPO_ROOT,
) -> nbformat.NotebookNode:
    """Run a percent-format notebook with `parameters`; optionally save the executed .ipynb to `output`.

    Raises nbclient's CellExecutionError if a cell fails. Parameters that are paths should be absolute or
    relative to `cwd` (the repository root by default, so `outputs/...` works as on the command line).
    """
    ensure_kernel()
    nb = inject_parameters(jupytext.read(path), dict(parameters or {}))
    nb.metadata["kernelspec"] = {"name": KERNEL, "display_name": "Python 3", "language": "python"}
    NotebookClient(
        nb, timeout=timeout, kernel_name=KERNEL, resources={"metadata": {"path": str(cwd)}}
    ).execute()
    if output is not None:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, str(output))
    return nb

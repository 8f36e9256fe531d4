"""Execute the walkthrough notebooks in place, so that the stored copies show their outputs.

    python notebooks/execute.py            # all three, on the embedded shapes model
    python notebooks/execute.py 02_goca    # one

Run from the repository root after changing a notebook or the shapes model. Each notebook is executed with
nbclient in a scratch folder and written back through a temporary file, so a failed run leaves the stored
notebook untouched. Standard-error output (progress bars, library warnings) is not stored. ``tests/test_notebooks.py`` executes them again on every test run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import nbclient
import nbformat

from difffeat.io import atomic_path

HERE = Path(__file__).resolve().parent


def execute(path: Path) -> None:
    """Run ``path`` top to bottom and store it with its outputs; raise on the first failing cell."""
    book = nbformat.read(path, as_version=4)
    with tempfile.TemporaryDirectory() as scratch:
        nbclient.NotebookClient(book, timeout=600, kernel_name="python3", resources={"metadata": {"path": scratch}}).execute()
    book.metadata.pop("widgets", None)
    for cell in book.cells:  # progress bars and library warnings (stderr) are noise in a stored walkthrough
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs if not (o.output_type == "stream" and o.name == "stderr")]
    with atomic_path(path) as tmp:
        nbformat.write(book, str(tmp))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", help="notebook stems (default: every notebook here)")
    args = p.parse_args(argv)
    paths = [HERE / f"{n}.ipynb" for n in args.names] if args.names else sorted(HERE.glob("*.ipynb"))
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        sys.exit(f"no such notebook: {', '.join(missing)} (have: {', '.join(p.stem for p in sorted(HERE.glob('*.ipynb')))})")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")]))
    for path in paths:
        execute(path)
        print(f"executed {path.relative_to(HERE.parent)}")


if __name__ == "__main__":
    main()

"""``python -m difffeat`` runs the CLI (same as the ``difffeat`` command)."""

from difffeat.cli import app

if __name__ == "__main__":
    app(prog_name="difffeat")

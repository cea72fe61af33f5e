"""`shoprec bench serve`: see the issue for what it measures and its JSON format."""

from __future__ import annotations

from pathlib import Path

import typer


def command(out: Path = typer.Option(Path("var/bench/serve.json"), help="where to write the JSON result")) -> None:
    """Not built yet."""
    raise typer.BadParameter("the serve benchmark is not built yet")

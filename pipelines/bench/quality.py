"""`shoprec bench quality`: see the issue for what it measures and its JSON format."""

from __future__ import annotations

from pathlib import Path

import typer


def command(out: Path = typer.Option(Path("var/bench/quality.json"), help="where to write the JSON result")) -> None:
    """Not built yet."""
    raise typer.BadParameter("the quality benchmark is not built yet")

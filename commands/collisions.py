"""Placeholder: replaced by the module that implements `engram collisions`."""

import typer


def register(app: typer.Typer) -> None:
    pass

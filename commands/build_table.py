"""Placeholder: replaced by the module that implements `engram build-table`."""

import typer


def register(app: typer.Typer) -> None:
    pass

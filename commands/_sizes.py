"""The size line printed after a plan table, and the notice for a large plan (build-table)."""

from __future__ import annotations

import typer
from engram_cli.commands._output import console

from engram_cli.pipeline.sizing import large_plan_notice
from engram_cli.units import format_bytes


def render_plan_size(footprint: dict) -> None:
    """`Size: 4.93 GiB (5,297,255,936 bytes; binary GiB = 2**30 bytes), 2.1% of the 230 GiB free at ...`."""
    free = footprint["free_disk_bytes"]
    share = footprint["share_of_free_disk"]
    where = f"{'under 0.1%' if share and share < 0.001 else f'{share:.1%}'} of the {format_bytes(free)} free on its disk" if free else "free disk space unknown"
    console.print(f"Size: [bold]{format_bytes(footprint['bytes'])}[/] ({footprint['bytes']:,} bytes; binary units, 1 GiB = 2^30 bytes), {where}.")
    notice = large_plan_notice(footprint)
    if notice:
        typer.echo(notice, err=True)  # a notice: stderr whatever stream the report uses

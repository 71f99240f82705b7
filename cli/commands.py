"""Imports each command module so that its `@app.command()` registers it on `app`."""

from . import archs_cmd, eval_cmd, export_cmd, inspect_cmd, plot_cmd, search_cmd, sweep_cmd, verify_cmd  # noqa: F401

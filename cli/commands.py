"""Imports each command module so that its `@app.command()` runs."""

from . import archs_cmd, inspect_cmd, search_cmd  # noqa: F401

for _optional in ("export_cmd", "eval_cmd", "verify_cmd"):
    # Commands from other work streams register themselves when their module exists.
    try:
        __import__(f"{__package__}.{_optional}")
    except ModuleNotFoundError as exc:
        if exc.name != f"{__package__}.{_optional}":
            raise

"""``ubsmoe methods``: the registered methods, one line each."""

from __future__ import annotations

from ubsmoe.cli.app import app, console


@app.command()
def methods() -> None:
    """List the registered methods."""
    # imports torch (seconds): only for this command, so the others start fast
    from ubsmoe.methods import available_methods, get_method_class

    for name in available_methods():
        doc = (get_method_class(name).__doc__ or "").strip().splitlines()[0]
        console.print(f"{name:10s} {doc}", highlight=False)



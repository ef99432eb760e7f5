"""typer's private name p2ptrain uses: the click it vendors (typer ≥ 0.2x), whose usage errors the CLI turns into
exit codes."""

try:
    from typer._click.exceptions import ClickException
except ImportError:  # typer that depends on click instead of vendoring it
    from click import ClickException

__all__ = ["ClickException"]

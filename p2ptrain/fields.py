"""Settings fields that are also command-line options: declared once, on the settings dataclass.

``cli/options.py`` turns every field made with ``option`` into a ``--flag`` of the peer commands (its type, default
and help from the field); the config file and the ``P2PTRAIN_*`` environment read the same fields.
"""

from __future__ import annotations

from dataclasses import MISSING, Field, field
from typing import Any


def option(default: Any = MISSING, help: str = "", *, flag: str = "", shown_default: str = "") -> Any:
    """A dataclass field with its option's ``--help`` text; ``flag`` names the option when it is not the field's name
    (``--threads`` for ``torch_threads``); ``shown_default`` replaces the default in ``--help``."""
    metadata = {"help": help, "flag": flag, "shown_default": shown_default}
    return field(metadata=metadata) if default is MISSING else field(default=default, metadata=metadata)


def is_option(f: Field) -> bool:
    return "help" in f.metadata


def flag_name(f: Field) -> str:
    return "--" + (f.metadata.get("flag") or f.name).replace("_", "-")

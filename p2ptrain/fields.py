"""Settings fields: the ones that are also command-line options, and how a value written as text is read.

``cli/options.py`` turns every field made with ``option`` into a ``--flag`` of the peer commands (its type, default
and help from the field); the config file and the ``P2PTRAIN_*`` environment read the same fields, text through
``parse_text``.
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


BOOLEAN = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def parse_text(kind: str, text: str) -> Any:
    """A setting's value written as text (``P2PTRAIN_*``, `p2ptrain config set`), for a field of type ``kind``: an
    int, a float, a bool (1/0, true/false, yes/no, on/off), a list (comma-separated), or the text (str, Path).

    Raises:
        ValueError: the text is not a ``kind``."""
    if kind.startswith("tuple"):
        return [part.strip() for part in text.split(",") if part.strip()]
    if kind == "bool":
        if text.lower() not in BOOLEAN:
            raise ValueError(text)
        return BOOLEAN[text.lower()]
    if kind == "int":
        return int(text)
    if kind == "float":
        return float(text)
    return text

"""Regenerate the embedded default corpus from the Python standard library's own docstrings.

The corpus ships inside the package (``p2ptrain/train/corpus/stdlib_docs.txt.gz``) so the demo and the
tests train on real English/technical text with no network. Run this only to refresh it:

    python scripts/make_corpus.py            # writes p2ptrain/train/corpus/stdlib_docs.txt.gz

The text is the Python Software Foundation's documentation strings (PSF licence).
"""

from __future__ import annotations

import argparse
import gzip
import importlib
import inspect
import pkgutil
import sys
import warnings
from pathlib import Path

# Modules that print, open windows, or are platform-specific: skipped for a quiet, stable corpus.
SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "lib2to3", "test", "msilib"}


def module_docs(name: str) -> list[str]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = importlib.import_module(name)
    except Exception:  # noqa: BLE001 - any import failure just means "not in the corpus"
        return []
    texts = [inspect.getdoc(module) or ""]
    for attr in sorted(vars(module)):
        if attr.startswith("_"):
            continue
        obj = getattr(module, attr)
        if getattr(obj, "__module__", None) != name or not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        texts.append(inspect.getdoc(obj) or "")
    return [t.strip() for t in texts if len(t.strip()) > 80]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(__file__).parent.parent / "p2ptrain/train/corpus/stdlib_docs.txt.gz"
    parser.add_argument("--out", type=Path, default=default)
    parser.add_argument("--max-bytes", type=int, default=1_500_000, help="stop after this much text")
    args = parser.parse_args()
    names = sorted(m.name for m in pkgutil.iter_modules() if m.name in sys.stdlib_module_names and m.name not in SKIP)
    chunks, size = [], 0
    for name in names:
        for text in module_docs(name):
            chunks.append(text)
            size += len(text) + 2
        if size >= args.max_bytes:
            break
    body = "\n\n".join(chunks).encode("utf-8")[: args.max_bytes]
    with gzip.GzipFile(args.out, "wb", mtime=0) as f:  # mtime=0: byte-identical output on rerun
        f.write(body)
    print(f"wrote {args.out} ({len(body):,} bytes of text from {len(chunks):,} docstrings)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

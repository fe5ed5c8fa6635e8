"""``kdzoo list``: every method (``--model``) and dataset (``--data``) with one line and its paper.

Read from the classes themselves (first docstring line; the arXiv id of the paper a method
declares in ``citation``, else the one its docstrings cite), so the list cannot drift from the
code.
"""

from __future__ import annotations

import inspect
import re
import sys
from dataclasses import dataclass

__all__ = ["Entry", "catalog", "main"]

_ARXIV = re.compile(r"arXiv[: ]\s*(\d{4}\.\d{4,5})")


@dataclass(frozen=True)
class Entry:
    kind: str  # "model" or "data"
    name: str
    description: str
    paper: str


def catalog() -> list[Entry]:
    """Every concrete class ``--model NAME`` and ``--data NAME`` accept, sorted by name."""
    import lightning as L

    import kdzoo.datamodules
    import kdzoo.methods
    from kdzoo.methods.module import KDZooModule

    entries = []
    for kind, package, base in (
        ("model", kdzoo.methods, KDZooModule),
        ("data", kdzoo.datamodules, L.LightningDataModule),
    ):
        for name in package.__all__:
            cls = getattr(package, name)
            if not (inspect.isclass(cls) and issubclass(cls, base)) or inspect.isabstract(cls):
                continue
            entries.append(Entry(kind, name, _first_line(cls), _paper(cls)))
    return sorted(entries, key=lambda e: (e.kind != "model", e.name.lower()))


def _first_line(cls: type) -> str:
    doc = inspect.getdoc(cls) or ""
    paragraph = " ".join(doc.split("\n\n", 1)[0].split())
    # Plain text for a terminal: drop Sphinx roles and literal quotes.
    return re.sub(r":\w+:`~?([^`]+)`", r"\1", paragraph).replace("``", "")


def _paper(cls: type) -> str:
    module = sys.modules.get(cls.__module__)
    for doc in (getattr(cls, "citation", None), cls.__doc__, getattr(module, "__doc__", None)):
        found = _ARXIV.findall(doc or "")
        if found:
            return "arXiv:" + ", arXiv:".join(dict.fromkeys(found))
    return ""


def main() -> None:
    entries = catalog()
    for kind, title in (("model", "Methods (--model NAME)"), ("data", "Datasets (--data NAME)")):
        print(title)
        for entry in (e for e in entries if e.kind == kind):
            paper = f"  [{entry.paper}]" if entry.paper else ""
            print(f"  {entry.name:<22} {entry.description}{paper}")
        print()
    print("Options of one: kdzoo fit --model.help NAME  /  kdzoo fit --data.help NAME")

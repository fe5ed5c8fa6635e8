"""Command-line mistakes explained in one line, with "did you mean" for close misspellings.

jsonargparse reports a bad option as 60-70 lines of usage followed by a nested validation
message. The ``kdzoo`` command raises parse errors instead (``exit_on_error=False``) and
:func:`explain_parse_error` turns them into the one thing to fix: the unknown option and the
closest known one, the unknown method or dataset and the list of valid ones, the config file
with a YAML syntax error and where.
"""

from __future__ import annotations

import difflib
import inspect
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from kdzoo.errors import KDZooError

__all__ = [
    "CommandLineError",
    "check_config_files",
    "did_you_mean",
    "explain_parse_error",
    "reorder_class_options",
]

CLASS_OPTIONS = ("model", "data")


class CommandLineError(KDZooError, ValueError):
    """An option, value or config file on the command line is wrong."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``"; did you mean X?"`` for the closest of ``choices``, or ``""``."""
    choices = list(choices)
    by_lower = {c.lower(): c for c in choices}
    match = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=0.6)
    return f"; did you mean {by_lower[match[0]]}?" if match else ""


def reorder_class_options(args: Sequence[str]) -> list[str]:
    """Move ``--model NAME`` / ``--data NAME`` before the first ``--model.x`` / ``--data.x``.

    jsonargparse reads options in order, so ``--data.root DIR --data ImageFolder`` would check
    ``root`` against the abstract base class and reject it; a user means the same as the other
    order.
    """
    args = list(args)
    for key in CLASS_OPTIONS:
        for i, token in enumerate(args):
            is_flag = token == f"--{key}" and i + 1 < len(args)
            if not (is_flag or token.startswith(f"--{key}=")):
                continue
            first_option = next(
                (j for j, t in enumerate(args[:i]) if t.startswith(f"--{key}.")), None
            )
            if first_option is not None:
                moved = args[i : i + 2] if is_flag else [token]
                del args[i : i + len(moved)]
                args[first_option:first_option] = moved
            break
    return args


def check_config_files(args: Sequence[str]) -> None:
    """Every ``-c FILE`` exists and is valid YAML; the error names the file and the place."""
    import yaml

    for i, token in enumerate(args):
        if token in ("-c", "--config") and i + 1 < len(args):
            path = args[i + 1]
        elif token.startswith("--config="):
            path = token.split("=", 1)[1]
        else:
            continue
        file = Path(path)
        if not file.is_file():
            raise CommandLineError(f"config file not found: {path} (from {Path.cwd()})")
        try:
            yaml.safe_load(file.read_text())
        except UnicodeDecodeError:
            raise CommandLineError(f"config file {path} is not a text (YAML) file") from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise CommandLineError(
                f"config file {path}: YAML syntax error{where}: {problem}"
            ) from None


def explain_parse_error(err: BaseException, known_options: Iterable[str] = ()) -> str:
    """One line saying what is wrong on the command line, and how to fix it.

    ``known_options`` are the option strings of the parser that failed, for "did you mean".
    """
    message = str(err)
    unknown = re.search(r"[Uu]nrecognized arguments: (.*)", message)
    if unknown:
        options = [t for t in unknown.group(1).split() if t.startswith("-")]
        option = options[0].split("=", 1)[0] if options else unknown.group(1)
        return f"unknown option {option}{did_you_mean(option, known_options)}"
    key = re.search(r'Parser key "([\w.]+)"', message)
    key = key.group(1) if key else ""
    bad_class = re.search(r"Expected a dot import path string: (\S+)", message)
    top = key.split(".")[0]
    if bad_class and top in CLASS_OPTIONS:
        return unknown_class_message(top, bad_class.group(1))
    not_accepted = re.search(r"Problem with given class_path '([\w.]+)':\s+Option '(\w+)'", message)
    if not_accepted:
        class_path, option = not_accepted.groups()
        params = _init_parameters(class_path)
        hint = did_you_mean(option, params).replace("mean ", f"mean --{top}.")
        if class_path.endswith(("LightningModule", "LightningDataModule")):
            hint = f"; choose the {top} first (--{top} NAME) and put its options after it"
        return f"--{top}.{option} is not an option of {class_path.rsplit('.', 1)[-1]}{hint}"
    required = re.search(r"the following arguments are required: (.*)", message)
    if required:
        prefix = f"--{key}." if key else "--"
        names = ", ".join(prefix + n for n in required.group(1).split(", "))
        return f"missing required option(s): {names.rstrip(',')}"
    if "Problems parsing config" in message:
        return message.replace("\n", " ")
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    detail = next((line for line in lines if not line.startswith(("Parser key", "-"))), "")
    useful = [line.lstrip("- ") for line in lines if "Expected a <class 'NoneType'>" not in line]
    first = f"{key}: " if key else ""
    return first + (useful[1] if len(useful) > 1 and useful[0].startswith("Parser") else detail)


def unknown_class_message(option: str, name: str) -> str:
    """The unknown ``--model``/``--data`` name, the closest valid one and the full list."""
    from kdzoo.catalog import catalog

    names = [entry.name for entry in catalog() if entry.kind == option]
    return (
        f"unknown --{option} {name}{did_you_mean(name, names)} Valid: {', '.join(names)} "
        "(`kdzoo list` describes each)"
    )


def _init_parameters(class_path: str) -> list[str]:
    """Every ``__init__`` parameter of ``class_path`` and its bases (they take ``**kwargs``)."""
    from jsonargparse.typing import import_object

    try:
        cls = import_object(class_path)
    except (ImportError, AttributeError, ValueError):
        return []
    names: list[str] = []
    for klass in inspect.getmro(cls):
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        for param in inspect.signature(init).parameters.values():
            kind_ok = param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD)
            if kind_ok and param.name != "self" and param.name not in names:
                names.append(param.name)
    return names

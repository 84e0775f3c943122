"""Small file helpers shared by the modules that keep state on disk: JSON that is checked when read,
and writes that are atomic (a reader, or a process killed mid-write, sees the old file or the new one,
never half of one)."""

from __future__ import annotations

import json
import os


def read_json_object(path: str, error: type[Exception] = ValueError, hint: str = "") -> dict:
    """The JSON object in ``path``; ``error`` with one line naming the file (and ``hint``) otherwise."""
    suffix = f"; {hint}" if hint else ""
    if not os.path.isfile(path):
        raise error(f"{path}: file not found{suffix}")
    try:
        with open(path) as f:
            data = json.load(f)
    except ValueError as problem:
        raise error(f"{path}: not valid JSON ({problem}){suffix}") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object{suffix}")
    return data


def write_text_atomic(path: str, text: str) -> None:
    """Writes ``text`` to a temporary file beside ``path`` and renames it into place."""
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w") as f:
        f.write(text)
    os.replace(temporary, path)


def write_json_atomic(path: str, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")

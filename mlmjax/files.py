"""Small file helpers shared by the modules that keep state on disk: JSON that is checked when read,
and writes that are atomic (a reader, or a process killed mid-write, sees the old file or the new one,
never half of one)."""

from __future__ import annotations

import contextlib
import json
import os
from typing import Iterator


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


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """A temporary path beside ``path`` to write; renamed onto ``path`` when the block succeeds,
    removed when it fails. For writers that take a path (``savefig``, image encoders).

    The temporary name is hidden (``.name.<pid>.tmp``, in the same folder so the rename stays on one
    filesystem): folder readers that skip dot files never take a half-written file for a real one.
    """
    folder, name = os.path.split(path)
    temporary = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):  # the writer failed part way
            os.remove(temporary)


def write_text_atomic(path: str, text: str) -> None:
    """Writes ``text`` to a temporary file beside ``path`` and renames it into place."""
    with atomic_path(path) as temporary, open(temporary, "w") as f:
        f.write(text)


def write_json_atomic(path: str, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")

"""Process-wide JAX settings that every mlmjax command applies before it compiles anything."""

from __future__ import annotations

import os
import sys
from typing import NoReturn

import jax

CACHE_ENV = "MLMJAX_COMPILATION_CACHE"


def enable_compilation_cache(directory: str | None = None) -> str:
    """Turns on JAX's persistent compilation cache; returns its folder.

    A rerun, a resumed run or a sweep then loads its executables from disk instead of compiling
    them again (the tiny train step: ~40 s to compile on a 2-core CPU, ~1 s to load). The folder is
    ``directory``, else ``$JAX_COMPILATION_CACHE_DIR`` or ``$MLMJAX_COMPILATION_CACHE``, else
    ``~/.cache/mlmjax/jax``. Entries are keyed by the program, the compiler options and the jax
    version, so a stale entry is never used.
    """
    directory = (directory or os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.environ.get(CACHE_ENV)
                 or os.path.join(os.path.expanduser("~"), ".cache", "mlmjax", "jax"))
    jax.config.update("jax_compilation_cache_dir", directory)
    # Cache everything: on CPU even small programs take seconds to compile.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory


def quiet_library_logs() -> None:
    """absl's ``app.run`` logs at INFO, where orbax writes several lines per checkpoint; commands show
    warnings and their own progress instead, unless the user passed ``--verbosity``."""
    from absl import flags, logging

    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)


def start_command() -> None:
    """What every ``python -m mlmjax.<command>`` main does first."""
    enable_compilation_cache()
    quiet_library_logs()


def fail(message: str) -> NoReturn:
    """A user error: one line on stderr, exit status 2, no traceback."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing (``app.run(main, flags_parser=runtime.parse_flags)``), with a bad flag or a
    config override that names no field (or gives a bad value) reported by :func:`fail`."""
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except (flags.Error, KeyError, AttributeError, TypeError, ValueError) as error:
        # ml_collections' KeyError text is a repr with escaped quotes and newlines: make it one line.
        message = str(error.args[0] if error.args else error).replace("\\n", " ").replace("\\'", "'")
        fail(f"bad flag or config override: {' '.join(message.replace(chr(39), '').split())}")

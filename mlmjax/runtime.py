"""Process-wide JAX settings that every mlmjax command applies before it compiles anything."""

from __future__ import annotations

import ctypes
import os
import re
import sys
from typing import NoReturn

import jax

CACHE_ENV = "MLMJAX_COMPILATION_CACHE"


def enable_compilation_cache(directory: str | None = None) -> str:
    """Turns on JAX's persistent compilation cache; returns its folder.

    A rerun, a resumed run or a sweep then loads its executables from disk instead of compiling
    them again (the tiny TI + MLM step on a 2-core CPU: 30 s to compile, 3 s to load; README,
    "Checkpoints and resuming", for larger steps). The folder is
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


# glibc's malloc serves a request above its mmap threshold (at most 32 MiB by default) with a mapping
# of its own and unmaps it when freed. XLA's CPU runtime allocates a step's temporaries afresh at every
# call, so a step whose temporaries exceed the threshold page-faulted them in, zeroed, at every step: the
# tiny TI + MLM step 38.7 ms and 10,080 page faults a step; 29.0 ms and none with them kept in the heap.
# Large steps keep their mappings (mlmjax.aot.compile_step asks only for steps whose temporaries fit):
# with buffers up to 256 MiB kept in the heap, SD 1.5's DreamBooth step ran no faster and its peak
# resident memory grew by 3 GB.
HEAP_BUFFERS_UP_TO = 256 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (malloc.h)
_MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
_reusing_host_memory = False


def reuse_host_memory() -> bool:
    """Lets freed host buffers of up to :data:`HEAP_BUFFERS_UP_TO` bytes be reused from malloc's heap
    instead of being mapped and page-faulted in again at every step; returns whether it applies.

    Only with glibc (Linux), and not where the user tuned malloc's thresholds already
    (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, or either in ``GLIBC_TUNABLES``). The heap also keeps
    up to twice that free at its top instead of handing it back to the system (glibc's own ratio), so a
    freed temporary is there for the next step. Values do not change. :func:`mlmjax.aot.compile_step`
    calls it for a CPU step whose temporaries fit.
    """
    global _reusing_host_memory
    if _reusing_host_memory:
        return True
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if any(name in os.environ for name in _MALLOC_ENV) or any(
            f"glibc.malloc.{name}" in tunables for name in ("mmap_threshold", "trim_threshold")):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # only glibc's malloc has these parameters
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    _reusing_host_memory = bool(mallopt(_M_MMAP_THRESHOLD, HEAP_BUFFERS_UP_TO)
                                and mallopt(_M_TRIM_THRESHOLD, 2 * HEAP_BUFFERS_UP_TO))
    return _reusing_host_memory


# A large step's temporaries (GBs at SD 1.5) keep their mappings, and the kernel faults them in at every
# step: 4 KiB at a time, 1.43 million faults and 7.1 s of kernel time in each 27 s SD 1.5 DreamBooth + MLM
# step (2-core AMD EPYC). With glibc's malloc asking for transparent huge pages (2 MiB) for its mappings,
# the same step took 22.6 s, with 6,191 faults and 3.0 s in the kernel, at the same peak memory. glibc
# reads the setting only when a process starts, hence the relaunch.
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
_THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def huge_page_environment(environ: dict[str, str] | None = None) -> dict[str, str] | None:
    """``environ`` (default: this process's) with glibc's malloc asking for transparent huge pages for its
    mappings (``GLIBC_TUNABLES`` gains :data:`HUGE_PAGES_TUNABLE`); None where that changes nothing: the
    tunable is set already (either way: ``glibc.malloc.hugetlb=0`` opts out), the C library is not glibc
    2.35 or newer, or the kernel gives no transparent huge pages."""
    environ = dict(os.environ if environ is None else environ)
    tunables = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in tunables:
        return None
    try:
        library, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        with open(_THP_SETTING) as f:
            setting = f.read()
    except (ValueError, OSError, AttributeError):  # not glibc, no such setting, no confstr
        return None
    if library != "glibc" or tuple(int(part) for part in version.split(".")[:2]) < (2, 35) or "[never]" in setting:
        return None
    environ["GLIBC_TUNABLES"] = f"{tunables}:{HUGE_PAGES_TUNABLE}" if tunables else HUGE_PAGES_TUNABLE
    return environ


def relaunch_with_huge_pages() -> None:
    """Runs this command again, in place (``os.execve``, same process id and arguments), under
    :func:`huge_page_environment`; returns where that changes nothing. A command's ``__main__`` calls it
    before parsing its flags; the module's imports are then paid twice (about 2 s)."""
    environ = huge_page_environment()
    if environ is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, sys.orig_argv, environ)


_CPU_DEVICES_FLAG = "--xla_force_host_platform_device_count"


def with_cpu_devices(environ: dict[str, str], devices: int,
                     setting: str = "config.mesh.cpu_devices") -> dict[str, str]:
    """``environ`` whose ``XLA_FLAGS`` give JAX's CPU platform ``devices`` devices instead of one
    (0 changes nothing). Raises ValueError, naming ``setting`` (what asked for the devices), for a
    negative count, or when ``XLA_FLAGS`` already asks for another."""
    if devices < 0:
        raise ValueError(f"{setting}={devices}: give a number of CPU devices, or 0 for one")
    flags = environ.get("XLA_FLAGS", "")
    asked = re.search(_CPU_DEVICES_FLAG + r"=(\d+)", flags)
    if devices == 0 or (asked and int(asked.group(1)) == devices):
        return dict(environ)
    if asked:
        raise ValueError(f"{setting}={devices}, but XLA_FLAGS has {asked.group(0)}: drop one of them")
    return dict(environ, XLA_FLAGS=f"{flags} {_CPU_DEVICES_FLAG}={devices}".strip())


def split_cpu(devices: int) -> None:
    """Gives this process's CPU ``devices`` JAX devices (:func:`with_cpu_devices`), so that a mesh's
    data-parallel shares run side by side on its cores, each device's operations a fraction of the
    whole batch's. Takes effect only before JAX starts its backends (a command's main calls it first):
    on 2 cores the tiny TI step took 11.1 ms on two devices against 15.4 on one (session 26); a step
    whose batch halves little (DreamBooth's one instance and one class image) pays the gradients'
    all-reduce and gains nothing (README, "Devices and sharding")."""
    os.environ.update(with_cpu_devices(dict(os.environ), devices))


def check_cpu_devices(devices: int) -> None:
    """Raises ValueError when ``config.mesh.cpu_devices`` asks for CPU devices JAX does not have: its
    backends started before :func:`split_cpu` could take effect."""
    if devices and jax.default_backend() == "cpu" and jax.local_device_count() != devices:
        raise ValueError(f"config.mesh.cpu_devices={devices}, but JAX's CPU has {jax.local_device_count()} "
                         "device(s): JAX started before the setting could apply; run python -m mlmjax.train, "
                         f"or set XLA_FLAGS={_CPU_DEVICES_FLAG}={devices} before JAX starts")


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

"""Process-wide settings of mlmjax.runtime: freed host buffers are reused from the heap."""

import json
import os
import subprocess
import sys

import pytest

# A buffer of 40 MiB (above glibc's largest default mmap threshold, 32 MiB), allocated, written and freed
# 20 times, as XLA's CPU runtime allocates a step's temporaries at every call; prints the page faults.
_ALLOCATE_AND_FREE = """
import ctypes, json, resource, sys
from mlmjax import runtime
applied = runtime.reuse_host_memory() if sys.argv[1] == "reuse" else None
if sys.argv[1] in ("small step", "large step"):  # compiled only: what the step's temporaries decide
    import jax, jax.numpy as jnp
    from mlmjax import aot
    side = 64 if sys.argv[1] == "small step" else 9000  # 9000² float32: 324 MB for the product
    x = jax.ShapeDtypeStruct((side, side), jnp.float32)
    applied = aot.compile_step(jax.jit(lambda x: jnp.sum(jnp.sin(x) @ x)), x).memory["temp"]
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
size = 40 << 20
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    buffer = libc.malloc(size)
    ctypes.memset(buffer, 1, size)
    libc.free(buffer)
print(json.dumps({"applied": applied, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""

glibc = pytest.mark.skipif(not sys.platform.startswith("linux") or not os.confstr("CS_GNU_LIBC_VERSION"),
                           reason="malloc's thresholds are glibc's")


def _page_faults(mode: str, **env: str) -> dict:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", _ALLOCATE_AND_FREE, mode], env={**environment, **env},
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.splitlines()[-1])


@glibc
def test_a_buffer_freed_at_every_step_is_reused_instead_of_faulted_in_again():
    pages = (40 << 20) // os.sysconf("SC_PAGE_SIZE")
    plain = _page_faults("plain")
    reused = _page_faults("reuse")
    assert reused["applied"] is True
    assert plain["faults"] >= 15 * pages  # a fresh mapping, faulted in page by page, at each of 20 calls
    assert reused["faults"] <= 3 * pages  # faulted in once, then reused from the heap


@glibc
def test_a_users_own_malloc_tuning_stands():
    result = _page_faults("reuse", MALLOC_MMAP_THRESHOLD_="65536")
    assert result["applied"] is False
    assert result["faults"] >= 15 * (40 << 20) // os.sysconf("SC_PAGE_SIZE")


@glibc
def test_compile_step_keeps_a_small_steps_temporaries_and_leaves_a_large_steps_mapped():
    pages = (40 << 20) // os.sysconf("SC_PAGE_SIZE")
    small = _page_faults("small step", JAX_PLATFORMS="cpu")
    large = _page_faults("large step", JAX_PLATFORMS="cpu")
    from mlmjax import runtime

    assert small["applied"] <= runtime.HEAP_BUFFERS_UP_TO < large["applied"]  # the temporaries' bytes
    assert small["faults"] <= 3 * pages
    assert large["faults"] >= 15 * pages


@glibc
def test_the_huge_page_tunable_joins_the_users_tunables_and_is_never_set_twice():
    from mlmjax import runtime

    assert runtime.huge_page_environment({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None  # opted out
    assert runtime.huge_page_environment({"GLIBC_TUNABLES": runtime.HUGE_PAGES_TUNABLE}) is None
    environ = runtime.huge_page_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=4", "HOME": "/h"})
    if environ is None:  # this machine's kernel or C library offers none: nothing may change
        version = tuple(int(part) for part in os.confstr("CS_GNU_LIBC_VERSION").split()[1].split(".")[:2])
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            assert "[never]" in f.read() or version < (2, 35)
        return
    assert environ == {"GLIBC_TUNABLES": f"glibc.malloc.arena_max=4:{runtime.HUGE_PAGES_TUNABLE}", "HOME": "/h"}


@glibc
def test_a_command_relaunches_itself_once_with_huge_pages_and_its_own_arguments():
    from mlmjax import runtime

    if runtime.huge_page_environment({}) is None:
        pytest.skip("this kernel gives no transparent huge pages")
    code = ("import os, sys; from mlmjax import runtime; print('start', sys.argv[1:], flush=True); "
            "runtime.relaunch_with_huge_pages(); print(os.environ['GLIBC_TUNABLES'], os.environ['KEPT'])")
    environment = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", code, "--flag=1"], env={**environment, "KEPT": "yes"},
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out == ["start ['--flag=1']", "start ['--flag=1']", f"{runtime.HUGE_PAGES_TUNABLE} yes"]


def test_cpu_devices_join_the_users_xla_flags_once_and_a_conflict_is_an_error():
    from mlmjax import runtime

    flag = "--xla_force_host_platform_device_count"
    assert runtime.with_cpu_devices({"PATH": "/bin"}, 0) == {"PATH": "/bin"}  # 0: JAX's default, one device
    assert runtime.with_cpu_devices({}, 2) == {"XLA_FLAGS": f"{flag}=2"}
    users = {"XLA_FLAGS": "--xla_cpu_enable_fast_math=false"}
    assert runtime.with_cpu_devices(users, 4)["XLA_FLAGS"] == f"--xla_cpu_enable_fast_math=false {flag}=4"
    assert users == {"XLA_FLAGS": "--xla_cpu_enable_fast_math=false"}  # the caller's mapping is left alone
    assert runtime.with_cpu_devices({"XLA_FLAGS": f"{flag}=2"}, 2) == {"XLA_FLAGS": f"{flag}=2"}  # never twice
    with pytest.raises(ValueError, match=f"config.mesh.cpu_devices=2, but XLA_FLAGS has {flag}=8: drop one"):
        runtime.with_cpu_devices({"XLA_FLAGS": f"{flag}=8"}, 2)
    with pytest.raises(ValueError, match="config.mesh.cpu_devices=-1: give a number of CPU devices"):
        runtime.with_cpu_devices({}, -1)

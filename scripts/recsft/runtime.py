"""CPU runtime choices: OpenMP wait policy, thread count and the ``dtype: auto`` answer on CPU, each with its reason.

``omp_defaults()`` must run before torch is imported (OpenMP reads its environment once, when torch loads it):
``recsft.cli`` calls it on import, and every script imports ``recsft.cli`` before anything that loads torch.
Nothing here imports torch at module level.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import time
from pathlib import Path

logger = logging.getLogger(__name__)
CACHE_FILE = Path(os.environ.get("RECSFT_CPU_CACHE", ".cache/cpu_bf16.json"))
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
_chosen: dict[str, str] = {}  # what omp_defaults / set_threads chose and why, for the log line


def omp_defaults() -> None:
    """``OMP_WAIT_POLICY=PASSIVE`` unless the user set one: idle OpenMP threads sleep instead of spinning.

    Spinning threads keep a core busy between parallel regions; on a CPU shared with other jobs (or with the
    tokenizer's and data loader's own threads) that time is taken from the work that needs it.
    """
    if "OMP_WAIT_POLICY" in os.environ:
        _chosen["omp"] = f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']} (set by the user)"
    else:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        _chosen["omp"] = "OMP_WAIT_POLICY=PASSIVE (default: idle threads sleep)"


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


GRADIENT_CHECKPOINTING_DEPRECATION = "`is_gradient_checkpointing` is deprecated"


def quiet_known_warnings() -> None:
    """Silence two library messages a user can do nothing about (each matched by its exact text):

    * bitsandbytes logs, when it is imported on a CPU with AVX512-BF16, that its optional faster CPU 4-bit
      kernel (the ``kernels`` package) is missing, although most runs use no 4-bit layer on the CPU; a run that
      does gets one line from ``recsft.modeling.load_model`` instead;
    * peft reads transformers' deprecated ``is_gradient_checkpointing`` property (a FutureWarning) whenever an
      adapter is attached (``recsft.modeling`` also silences it around those calls, see :func:`no_peft_deprecation`).
    """
    import warnings

    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        _DropMessage("Failed to load CPU gemm_4bit_forward from kernels-community"))
    warnings.filterwarnings("ignore", message=GRADIENT_CHECKPOINTING_DEPRECATION, category=FutureWarning)


@contextlib.contextmanager
def no_peft_deprecation():
    """Context: peft's read of transformers' deprecated ``is_gradient_checkpointing`` warns nothing (also where the
    process's warning filters were reset, e.g. under pytest)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=GRADIENT_CHECKPOINTING_DEPRECATION, category=FutureWarning)
        yield


def physical_cores() -> int:
    """Physical cores this process may run on: CPU affinity, one per core (hyper-threads merged), cgroup quota."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cpus = list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topo / "physical_package_id").read_text().strip(), (topo / "core_id").read_text().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))
    n = len(cores) or 1
    try:  # cgroup v2 CPU quota (containers): "max 100000" or "200000 100000"
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            n = min(n, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return n


def idle_cores(cores: int) -> tuple[int, float]:
    """``(cores not already busy, 1-minute load average)``: the physical cores minus the load, at least 1."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # Windows
        return cores, 0.0
    return max(1, min(cores, cores - int(load + 0.5))), load


def set_threads(num_threads: str | int = "auto") -> int:
    """Set torch's intra-op threads: an explicit number, else ``OMP_NUM_THREADS`` if set, else the idle cores.

    Hyper-threads share a core's vector units, so one thread per physical core is the fastest for matmuls. On a
    CPU that other jobs already keep busy, fewer threads: each parallel region waits for its slowest thread, and a
    thread that has to share its core with another process stalls all of them (measured in docs/performance.md).
    The load is read once, when the threads are set.
    """
    import torch

    if str(num_threads) != "auto":
        n, why = int(num_threads), "num_threads in the config"
    elif os.environ.get("OMP_NUM_THREADS", "").isdigit():
        n, why = int(os.environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS set by the user"
    else:
        cores = physical_cores()
        n, load = idle_cores(cores)
        why = (f"auto: {cores} physical cores available to this process" if n == cores else
               f"auto: {cores} physical cores, load average {load:.1f} from other jobs")
    torch.set_num_threads(max(1, n))
    _chosen["threads"] = f"{torch.get_num_threads()} threads ({why})"
    return torch.get_num_threads()


def cpu_flags() -> set[str] | None:
    """The CPU feature flags from /proc/cpuinfo (x86 Linux), or None where there is no such list."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return None


def _timed_bf16_is_faster() -> bool:
    """Time a 512x512 matmul in float32 and bfloat16 once (best of 5 each): is bfloat16 not slower?"""
    import torch

    a = torch.randn(512, 512)
    times = {}
    for dtype in (torch.float32, torch.bfloat16):
        x = a.to(dtype)
        x @ x  # warm-up
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            x @ x
            best = min(best, time.perf_counter() - t)
        times[dtype] = best
    return times[torch.bfloat16] <= times[torch.float32]


def cpu_bf16_native() -> tuple[bool, str]:
    """Whether this CPU computes bfloat16 natively, and why we think so.

    x86: the ``avx512_bf16`` / ``amx_bf16`` flags (without them torch emulates bf16 matmuls, which was ~20x
    slower than float32 for training on an AVX2-only EPYC). Elsewhere (ARM, macOS): a tiny matmul timed once,
    the answer cached in ``.cache/cpu_bf16.json`` per CPU and torch version.
    """
    flags = cpu_flags()
    if flags is not None and platform.machine().lower() in ("x86_64", "amd64", "i686", "i386"):
        found = [f for f in BF16_FLAGS if f in flags]
        if found:
            return True, f"CPU has {'/'.join(found)}: native bf16 matmuls"
        return False, "CPU lacks avx512_bf16/amx_bf16: bf16 matmuls would be emulated"
    import torch

    key = f"{platform.machine()}|{platform.processor()}|{os.cpu_count()}|torch {torch.__version__}"
    try:
        cached = json.loads(CACHE_FILE.read_text())
        if cached.get("key") == key:
            return bool(cached["bf16"]), f"timed once (cached in {CACHE_FILE}): bf16 matmul {'not ' * (not cached['bf16'])}slower than float32"
    except (OSError, ValueError, KeyError):
        pass
    fast = _timed_bf16_is_faster()
    try:
        from .io import write_json_atomic

        write_json_atomic(CACHE_FILE, {"key": key, "bf16": fast})
    except OSError:
        pass
    return fast, f"timed a matmul: bf16 {'not ' * (not fast)}slower than float32"


def cpu_auto_dtype() -> tuple[str, str]:
    """``("bfloat16" | "float32", reason)`` for ``dtype: auto`` on CPU."""
    native, why = cpu_bf16_native()
    return ("bfloat16" if native else "float32"), why


def describe(device: str, dtype: str, why: str) -> str:
    """The one log line: dtype and threads chosen, and why."""
    parts = [f"{device}: dtype {dtype} ({why})"]
    if device == "cpu":
        parts += [_chosen.get("threads", "threads not set by recsft"), _chosen.get("omp", "OMP_WAIT_POLICY unchanged")]
    return "; ".join(parts)

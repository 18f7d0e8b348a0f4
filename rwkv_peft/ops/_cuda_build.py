"""Build CUDA kernels on first use, cached, and safe when several processes (DDP ranks) start at once.

Nothing here runs on import. ``load_kernel_library`` compiles the sources of one kernel folder with
``torch.utils.cpp_extension.load`` (ninja) into a build directory named after a hash of everything that changes
the binary -- source contents, flags, GPU arch, torch and CUDA versions, Python version -- so a stale build is
never loaded and rebuilding is only ever needed once per combination:

    <cache root>/<name>-<hash16>/          build directory (ninja files, objects, the .so, build.log)
    <cache root>/<name>-<hash16>.lock      inter-process lock (fcntl/msvcrt through ``filelock``)

The cache root is, in order: the ``cache_dir`` argument, ``$RWKV_PEFT_KERNEL_CACHE`` (read at call time),
``$XDG_CACHE_HOME/rwkv_peft/kernels``, ``~/.cache/rwkv_peft/kernels``.

One process builds while the others wait on the lock, then load the finished library (ninja sees it is up to
date). The lock is an OS lock, released if its holder dies, so a killed build never blocks later runs; a stale
torch "baton" file left by a killed build is removed under the lock. A failed build raises ``KernelBuildError``
carrying the compiler output and the path of ``build.log`` where it is also written -- never swallowed.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Optional, Sequence

from ..errors import EXIT_FAILED, RWKVPeftError

CACHE_ENV = "RWKV_PEFT_KERNEL_CACHE"
LOCK_TIMEOUT_ENV = "RWKV_PEFT_KERNEL_LOCK_TIMEOUT"   # seconds to wait for another process's build (default 1800)
BUILD_FORMAT = "1"   # bump to invalidate every cached build


class KernelBuildError(RWKVPeftError, RuntimeError):
    exit_code = EXIT_FAILED
    """The kernel could not be compiled or loaded; ``log_path`` holds the full compiler output."""

    def __init__(self, message: str, log_path: Optional[Path] = None):
        super().__init__(message)
        self.log_path = log_path


def repo_kernel_dir(name: str) -> Path:
    """Where the sources of kernel folder ``name`` are: ``<repo>/kernels/<name>`` (or inside the package)."""
    here = Path(__file__).resolve()
    for candidate in (here.parents[2] / "kernels" / name, here.parents[1] / "kernels" / name):
        if candidate.is_dir():
            return candidate
    return here.parents[2] / "kernels" / name


def cache_root(cache_dir: Optional[os.PathLike] = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "rwkv_peft" / "kernels"


def find_nvcc() -> Optional[str]:
    """Path of nvcc as torch's extension builder will find it (CUDA_HOME first), or None."""
    try:
        from torch.utils.cpp_extension import CUDA_HOME
    except Exception:  # pragma: no cover - torch always has it
        CUDA_HOME = None
    if CUDA_HOME:
        p = Path(CUDA_HOME) / "bin" / ("nvcc.exe" if os.name == "nt" else "nvcc")
        if p.exists():
            return str(p)
    return None


def nvcc_version(nvcc: Optional[str]) -> str:
    if not nvcc:
        return "none"
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except Exception as e:  # pragma: no cover
        return f"unknown ({e})"
    lines = [ln for ln in out.splitlines() if "release" in ln]
    return lines[-1].strip() if lines else out.strip().splitlines()[-1] if out.strip() else "unknown"


def build_key(sources: Sequence[Path], options: Dict[str, object]) -> str:
    """Hash of the source files (names and bytes) and every option that changes the binary."""
    h = hashlib.sha256()
    h.update(f"rwkv_peft-kernel-build-{BUILD_FORMAT}\n".encode())
    for src in sorted(Path(s) for s in sources):
        h.update(src.name.encode() + b"\0")
        h.update(src.read_bytes())
        h.update(b"\0")
    for key in sorted(options):
        h.update(f"{key}={options[key]!r}\n".encode())
    return h.hexdigest()[:16]


def build_dir_for(name: str, key: str, cache_dir: Optional[os.PathLike] = None) -> Path:
    return cache_root(cache_dir) / f"{name}-{key}"


def load_kernel_library(name: str, sources: Sequence[Path], *, arch: str, extra_cuda_cflags: Sequence[str] = (),
                        extra_cflags: Sequence[str] = (), cache_dir: Optional[os.PathLike] = None,
                        verbose: bool = False) -> Path:
    """Compile (once) and load the library; its ``TORCH_LIBRARY`` ops appear under ``torch.ops``.

    ``arch`` is the compute capability as ``"90"``; the code is generated for exactly that arch. Returns the
    build directory. Raises ``KernelBuildError`` (with the log path) if the build or the load fails.
    """
    import torch
    import torch.utils.cpp_extension as cpp_ext
    from filelock import FileLock, Timeout

    sources = [Path(s) for s in sources]
    cuda_flags = ["-O3", "-lineinfo", f"-gencode=arch=compute_{arch},code=sm_{arch}", *extra_cuda_cflags]
    c_flags = ["-O3", *extra_cflags]
    options = {
        "arch": arch, "cuda_flags": cuda_flags, "c_flags": c_flags, "torch": torch.__version__,
        "torch_cuda": torch.version.cuda, "nvcc": nvcc_version(find_nvcc()),
        "python": f"{sys.version_info[0]}.{sys.version_info[1]}", "platform": sys.platform,
    }
    key = build_key(sources, options)
    build_dir = build_dir_for(name, key, cache_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    log_path = build_dir / "build.log"
    lock = FileLock(str(build_dir) + ".lock")
    timeout = float(os.environ.get(LOCK_TIMEOUT_ENV, "1800"))
    try:
        with lock.acquire(timeout=timeout):
            # We hold the OS lock, so nobody else is building here: a torch baton left by a killed build is stale.
            baton = build_dir / "lock"
            if baton.exists():
                baton.unlink()
            started = time.time()
            try:
                cpp_ext.load(
                    name=f"{name}_{key}",
                    sources=[str(s) for s in sources],
                    extra_cflags=c_flags,
                    extra_cuda_cflags=cuda_flags,
                    build_directory=str(build_dir),
                    is_python_module=False,
                    verbose=verbose,
                )
            except Exception as e:  # compiler output is in the message (ninja's stdout)
                log_path.write_text(
                    f"build of {name} failed ({time.strftime('%Y-%m-%d %H:%M:%S')})\n"
                    f"options: {options}\nsources: {[str(s) for s in sources]}\n\n{e}\n")
                tail = "\n".join(str(e).splitlines()[-25:])
                raise KernelBuildError(
                    f"building the {name} CUDA kernel failed; full compiler output in {log_path}\n{tail}",
                    log_path) from e
            if not log_path.exists() or "failed" in log_path.read_text()[:40]:
                log_path.write_text(
                    f"build of {name} ok ({time.strftime('%Y-%m-%d %H:%M:%S')}, {time.time() - started:.1f} s "
                    f"including the up-to-date check)\noptions: {options}\n"
                    f"sources: {[str(s) for s in sources]}\n")
    except Timeout as e:
        raise KernelBuildError(
            f"waited {timeout:.0f} s for another process building {build_dir} (lock {lock.lock_file}); "
            f"set {LOCK_TIMEOUT_ENV} to wait longer", log_path) from e
    return build_dir

"""lorakit's compiled CPU kernels: built from `lorakit/csrc` on first use, cached, optional.

The C++ sources are compiled with torch's extension builder the first time a CPU training step
needs them (about 20 s, once per machine, torch version and source) and cached under
`$LORAKIT_CACHE/kernels` (default `~/.cache/lorakit/kernels`). Without a C++ compiler or ninja,
or with `LORAKIT_CPU_KERNELS=0`, lorakit logs why once and keeps its pure-PyTorch kernels, which
compute the same results (tests/test_attention.py and tests/test_fused.py hold the two equal).
The kernels: packed-row causal attention (lorakit.attention), RMSNorm, the SwiGLU gate, rotary
position embeddings, the loss head's cross-entropy, LoRA dropout's keep-mask and, on CPUs with
AVX512-BF16, the LoRA layers' rank-r products (lorakit.fused); and a CPU allocator that keeps freed
large blocks by size (lorakit.host_memory.cache_large_blocks).

The build targets the machine it runs on (`-march=native`), so the cache key includes the CPU
model as well as the sources and torch's version: a cache shared between different machines
keeps one build per CPU.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import shutil
import stat
import tempfile
import threading
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

log = logging.getLogger(__name__)

_SOURCE_NAMES = (
    "attention_cpu.cpp", "rms_norm_cpu.cpp", "silu_gate_cpu.cpp", "cross_entropy_cpu.cpp", "dropout_cpu.cpp",
    "rope_cpu.cpp", "lora_cpu.cpp", "block_cache_cpu.cpp",
)
_HEADER_NAMES = ("bf16_pairs.h", "float_bits.h", "vector_exp.h")
SOURCES = tuple(Path(__file__).parent / "csrc" / name for name in _SOURCE_NAMES)
HEADERS = tuple(Path(__file__).parent / "csrc" / name for name in _HEADER_NAMES)
_NAME = "lorakit_cpu"
# -fopenmp: at::parallel_for splits work across threads only when the caller is compiled with
# OpenMP (torch's libgomp is already loaded; the extension links the same soname). -ffast-math
# lets the compiler vectorize expf (glibc's libmvec) in the softmax loop.
_CFLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp"]
_LDFLAGS = ["-fopenmp"]

# The element types the kernels are compiled for; others keep the PyTorch paths.
DTYPES = (torch.float32, torch.bfloat16)

_lock = threading.Lock()
_state: dict[str, object] = {}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _library_path() -> Path:
    """Where the built library lives: one file per (sources, torch version, CPU model, flags)."""
    digest = hashlib.sha256()
    for source in SOURCES + HEADERS:
        digest.update(source.read_bytes())
    digest.update(" ".join([torch.__version__, platform.machine(), _cpu_model(), *_CFLAGS]).encode())
    root = Path(os.environ.get("LORAKIT_CACHE", "~/.cache/lorakit")).expanduser() / "kernels"
    return root / f"{_NAME}-{digest.hexdigest()[:16]}.so"


def _compile_into(library: Path, announce: Optional[Callable[[str], None]]) -> None:
    """Compile the sources in a private folder and move the library into place in one rename
    (under `_one_builder_at_a_time`)."""
    from torch.utils import cpp_extension

    message = f"compiling lorakit's CPU kernels into {library} (once, about 20 s)"
    announce(message) if announce is not None else log.info(message)
    _private_folder(library.parent)
    staging = Path(tempfile.mkdtemp(prefix=f".{library.stem}-", dir=library.parent))
    try:
        # is_python_module=False: the library registers torch.ops.lorakit_cpu itself, so only
        # ATen's headers are compiled, not pybind11's. load() also loads it into this process.
        cpp_extension.load(
            name=_NAME,
            sources=[str(s) for s in SOURCES],
            extra_cflags=_CFLAGS,
            extra_ldflags=_LDFLAGS,
            build_directory=str(staging),
            is_python_module=False,
            verbose=False,
        )
        built = staging / f"{_NAME}.so"
        os.chmod(built, stat.S_IMODE(os.stat(built).st_mode) & ~0o022)  # loaded only if no one else can write it
        os.replace(built, library)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _private_folder(folder: Path) -> None:
    """Make `folder` where missing, writable by its owner alone whatever the umask (`untrusted_because`)."""
    if not folder.is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        os.chmod(folder, stat.S_IMODE(os.stat(folder).st_mode) & ~0o022)


@contextlib.contextmanager
def _one_builder_at_a_time(library: Path) -> Iterator[None]:
    """Hold an exclusive lock on a file beside `library` while building it: processes that start
    together (torchrun's ranks on a fresh machine) would otherwise each compile, N builds sharing the
    cores. An flock is released by the kernel when its holder dies, so a build killed halfway leaves
    no lock behind, unlike torch's own lock files; where there is no fcntl (Windows) each builds.
    The file goes when the build ends: later processes find the library and take no lock (one that
    took the old file's lock meanwhile still finds it, and after a failed build builds itself)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    _private_folder(library.parent)
    lock_path = library.with_name(f".{library.name}.lock")
    # (not through a link another user may have planted there, nor blocking on a FIFO)
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(lock_path, flags, 0o644)
    with os.fdopen(fd, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            lock_path.unlink(missing_ok=True)
            fcntl.flock(lock, fcntl.LOCK_UN)


def untrusted_because(library: Path) -> Optional[str]:
    """Why the cached `library` must not be loaded (loading runs its code in this process), or None:
    it and its folder must be this user's (or root's), written by no one else, and it a plain file,
    not a link. A cache others can write to (a shared LORAKIT_CACHE) could hold their library under
    the name this one takes, which is predictable from the sources, torch and the CPU. Writable by
    the group is fine where the group is the user's own, named as the user and with no other member
    (umask 002 with a group per user, Ubuntu's and Fedora's default), not a shared one (`users`).
    The folder being no one else's, the file checked is the file loaded."""
    if not hasattr(os, "getuid"):  # (Windows: no owners to check)
        return None
    for path in (library.parent, library):
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            return f"{path} is a symbolic link"
        if st.st_uid not in (os.getuid(), 0):
            return f"{path} belongs to another user (uid {st.st_uid})"
        if st.st_mode & 0o002 or (st.st_mode & 0o020 and not _own_group(st.st_gid)):
            return f"{path} is writable by other users (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def _own_group(gid: int) -> bool:
    """Whether group `gid` is the user's private group: named as the user, no other member."""
    import grp
    import pwd

    try:
        group, user = grp.getgrgid(gid), pwd.getpwuid(os.getuid()).pw_name
    except KeyError:  # a group or user without a name
        return False
    # (members are listed in gr_mem, or have the group as their primary one)
    return group.gr_name == user and set(group.gr_mem) <= {user} and not any(
        p.pw_gid == gid and p.pw_name != user for p in pwd.getpwall()
    )


class _Untrusted(Exception):
    pass


def _load(library: Path) -> None:
    """Load the cached `library`, unless `untrusted_because` says why not (raised as _Untrusted)."""
    reason = untrusted_because(library)
    if reason is not None:
        raise _Untrusted(reason)
    torch.ops.load_library(str(library))


def _build(announce: Optional[Callable[[str], None]]) -> Optional[object]:
    if os.environ.get("LORAKIT_CPU_KERNELS", "1") == "0":
        log.info("LORAKIT_CPU_KERNELS=0: using the PyTorch CPU kernels")
        return None
    library = _library_path()
    try:
        if library.exists():
            _load(library)
        else:
            with _one_builder_at_a_time(library):
                if library.exists():  # built by the process this one waited for (checked as any other)
                    _load(library)
                else:
                    _compile_into(library, announce)  # which loads it too
    except _Untrusted as exc:
        log.warning("lorakit's cached CPU kernels are not loaded: %s, and loading them runs their code; using the "
                    "PyTorch kernels instead. Set LORAKIT_CACHE to a folder only you can write to.", exc)  # fmt: skip
        return None
    except Exception as exc:  # no compiler, no ninja, a read-only cache, an unsupported platform
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        log.warning(
            "lorakit's CPU kernels could not be built (%s); using the PyTorch kernels instead, which are "
            "slower on CPU. Install a C++ compiler and `pip install ninja`, or set LORAKIT_CPU_KERNELS=0 "
            "to silence this.",
            first_line,
        )
        return None
    return torch.ops.lorakit_cpu


def ops(announce: Optional[Callable[[str], None]] = None) -> Optional[object]:
    """`torch.ops.lorakit_cpu` (attention_, rms_norm_ and silu_gate_forward / _backward, rope,
    cross_entropy_rows, cross_entropy_losses, dropout_mask_mul, cache_large_blocks /
    large_block_stats; the bf16 lora_project / lora_outer come through `bf16_ops`), built on the
    first call; None where it cannot be built (the reason is logged once). `announce` is told when
    a build starts (the trainer prints it; otherwise it goes to this module's logger at INFO)."""
    if "ops" not in _state:
        with _lock:
            if "ops" not in _state:
                _state["ops"] = _build(announce)
    return _state["ops"]


def bf16_ops() -> Optional[object]:
    """`ops()` where the build also has the kernels for CPUs with AVX512-BF16 (the attention's bf16
    GEMMs, lora_project, lora_outer); None otherwise."""
    if "bf16" not in _state:
        built = ops()
        _state["bf16"] = built if built is not None and built.bf16_gemm_available() else None
    return _state["bf16"]


def ops_for(*tensors: torch.Tensor) -> Optional[object]:
    """`ops()` when every tensor is a CPU tensor of a kernel dtype (`DTYPES`); None otherwise or
    where the kernels cannot be built."""
    if all(t.device.type == "cpu" and t.dtype in DTYPES for t in tensors):
        return ops()
    return None

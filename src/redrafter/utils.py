"""Small shared helpers: atomic file and directory writes."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def check_output_directory(path: str | os.PathLike, flag: str = "--out") -> Path:
    """``path`` as an output directory: fine if it is one or does not exist yet (it is created when
    written); an error naming ``flag`` if it exists as anything else, checked before a run starts so
    that a finished run's results are never lost to it."""
    from redrafter.errors import RedrafterError

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RedrafterError(f"{flag} {path} exists and is not a directory")
    return path


def ordinary_permissions(path: str | os.PathLike) -> None:
    """Give a file the permissions of one created as usual (0666 minus the umask): safetensors'
    ``save_file`` creates its files owner-only (0600), unlike every other file we write."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a file so readers see the old or the new content, never a torn one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``path`` (an interrupted write
    leaves the previous ``path`` intact)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    tmp.chmod(0o755)  # mkdtemp makes it owner-only; the result is an ordinary directory
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def release_free_heap() -> None:
    """Hand freed heap memory back to the OS where the C library allows it (glibc ``malloc_trim``).

    Tensors of a few MB come from the heap once glibc's adaptive mmap threshold has risen, and a
    freed block in the middle of the heap stays mapped; trimming returns those pages. No-op elsewhere.
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        pass


HUGE_PAGE = 2 << 20  # bytes in an x86-64 huge page
ARENA_ALIGN = 4096  # each tensor starts on its own page


def weight_arena(tensors: list) -> list:
    """CPU copies of ``tensors`` laid out one after another, in the order given, in one block of memory
    that Linux backs with huge pages where it allows (``madvise(MADV_HUGEPAGE)``, which a system whose
    transparent huge pages are set to "madvise", the common default, needs before it uses them).

    For weights that a forward streams in a fixed order (models/native.py): 4 KB pages cost a
    translation miss every 4 KB of a 50 MB stream, and weights scattered over the heap restart the
    stream at every product. In the order of use on huge pages, a decoding step of the embedded SmolLM2
    took about 9 % less time (docs/PERFORMANCE.md). Returns views of the block, with each tensor's
    dtype, shape and values; the block lives as long as any of them."""
    import mmap

    import torch

    sizes = [(t.numel() * t.element_size() + ARENA_ALIGN - 1) // ARENA_ALIGN * ARENA_ALIGN for t in tensors]
    total = max(HUGE_PAGE, (sum(sizes) + HUGE_PAGE - 1) // HUGE_PAGE * HUGE_PAGE)
    if hasattr(mmap, "MAP_ANONYMOUS"):
        block = mmap.mmap(-1, total, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # page-aligned, zero-filled
        if hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                block.madvise(mmap.MADV_HUGEPAGE)
            except OSError:  # a kernel without transparent huge pages: 4 KB pages, still in order
                pass
        memory = torch.frombuffer(block, dtype=torch.uint8)  # holds a reference to the block
    else:  # no anonymous mmap (Windows): one heap block, still in order
        memory = torch.empty(total, dtype=torch.uint8)
    views, offset = [], 0
    for tensor, size in zip(tensors, sizes):
        nbytes = tensor.numel() * tensor.element_size()
        view = memory[offset: offset + nbytes].view(tensor.dtype).view(tensor.shape)
        view.copy_(tensor)
        views.append(view)
        offset += size
    return views

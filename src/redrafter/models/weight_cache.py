"""A cache on disk of a model's packed 4- and 8-bit weights, so a reload skips grid recovery.

``--weights int4`` recovers each decoder weight's 4- or 8-bit grid from the float32 weights and packs
it for our kernels (``int4.pack_int4`` / ``pack_int8`` / ``pack_parts``). That is about a minute of
arithmetic for Qwen2.5-1.5B (grid recovery of 1.3 billion weights), repeated by every process that
loads the model. The first load saves the packed tensors here; later loads read them (about a sixth of
the float32 bytes) instead.

One safetensors file per model, setting and installation (the "variant": the model directory, the
activation dtype, whose packing runs (ours or torch's, from ``--int4-kernel`` and whether our kernel
for the dtype runs here), torch's CPU capability and the machine type, whose instruction sets decide torch's own int4 layout, and where
this package is installed), under a key that also hashes the model's weight files (name, size,
modification time) and config.json, torch's version, and the code that decides the packed bytes
(``int4.py``, ``native.py``, ``loading.py``, this file, and the extension source with the pack functions
and kernels for the dtype). A stale file is never read, and it is deleted when its variant's new file is
saved. Files are written atomically (a temporary name, then a rename), and a file that cannot be read
is ignored and replaced. Files live under ``<cache root>/packed`` (``loading.cache_root``).
``REDRAFTER_WEIGHT_CACHE=off`` turns the cache off.

The file holds, per decoder layer and weight ("qkv", "o", "gate_up", "down") and for the LM head,
the packed tensors and scales of each part, and in its metadata (JSON) each weight's kind (int4,
int8, mixed), kernel, shape and group size.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from redrafter.models import kernels
from redrafter.models.int4 import Int4Weight, Int8Weight, MixedWeight, our_module

FORMAT = "1"  # the layout of the file itself; bumped when it changes
_KERNEL_FUNCTIONS = {  # (kind, kernel) -> the extension function that multiplies by such a weight
    ("int4", "avx512"): "int4_mm", ("int4", "avx2"): "mm_f32",
    ("int8", "avx512"): "int8_mm", ("int8", "avx2"): "mm_f32",
    ("mixed", "avx512"): "mixed_mm", ("mixed", "avx2"): "mixed_mm_f32",
}

log = logging.getLogger(__name__)


def enabled() -> bool:
    return os.environ.get("REDRAFTER_WEIGHT_CACHE", "on").lower() not in ("off", "0", "false", "no")


# The code that decides a file's bytes: which weights are packed and how (native.py's fused weights and
# grids, loading.py's LM head, int4.py's grids and scales), this file's layout, and the pack functions of
# the kernels' extensions (with their kernels: the layouts are theirs).
_PACKING_CODE = [Path(__file__).with_name(name) for name in ("int4.py", "native.py", "loading.py", "weight_cache.py")]
_KERNEL_PACKING_CODE = {torch.float32: [Path(__file__).with_name("csrc") / "avx2" / "gemm_f32.cpp"],
                        torch.bfloat16: [Path(__file__).with_name("csrc") / "int4_gemm.cpp"]}


def cache_path(model_dir: Path, dtype: torch.dtype, int4_kernel: str, root: Path) -> Path | None:
    """Where the packed weights of the model in ``model_dir`` for activations in ``dtype`` and
    ``--int4-kernel int4_kernel`` live (see the module docstring for what the key covers), or None when
    the key cannot be made (a source file missing: the cache is then not used)."""
    model_dir = Path(model_dir).resolve()
    # which of our kernels run here (``REDRAFTER_INT4_KERNEL=torch``, a failed build) decides the packing,
    # and torch's own int4 packing depends on the CPU's instruction set
    ours = {torch.float32: kernels.avx2, torch.bfloat16: kernels.int4}.get(dtype, lambda: None)() is not None
    capability = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", lambda: "")()
    # the variant: one file per model, setting and installation (a checkout's code changes replace its own
    # file, not another installation's)
    packing = "ours" if ours and int4_kernel != "torch" else "torch"  # "auto" and "avx2" pack the same bytes
    variant = hashlib.sha256("\0".join((str(model_dir), str(dtype), packing, capability,
                                        platform.machine(), INSTALLATION)).encode())
    digest = hashlib.sha256(f"{FORMAT}\0{torch.__version__}\0".encode())
    try:
        for path in sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.bin")):
            stat = path.stat()
            digest.update(f"{path.name}|{stat.st_size}|{stat.st_mtime_ns}\0".encode())
        for path in [model_dir / "config.json"] + _PACKING_CODE + _KERNEL_PACKING_CODE.get(dtype, []):
            digest.update(path.read_bytes())
    except OSError as exc:
        log.warning("not using the packed-weight cache: %s", exc)
        return None
    return root / "packed" / f"{model_dir.name}-{variant.hexdigest()[:8]}-{digest.hexdigest()[:16]}.safetensors"


def _stale_versions(path: Path) -> list[Path]:
    """Files of the same variant as ``path`` under another key (older model files or code)."""
    variant = path.name.rsplit("-", 1)[0]
    return [other for other in path.parent.glob(f"{variant}-*.safetensors") if other != path]


def _describe(weight, name: str, tensors: dict[str, torch.Tensor]) -> dict:
    """``weight``'s metadata, adding its tensors to ``tensors`` under ``name``."""
    if isinstance(weight, MixedWeight):
        return {"kind": "mixed", "kernel": weight.kernel,
                "parts": [_describe(part, f"{name}.{i}", tensors) for i, part in enumerate(weight.parts)]}
    tensors[f"{name}.packed"] = weight.packed.contiguous()
    tensors[f"{name}.scales"] = weight.scales.contiguous()
    entry = {"kernel": weight.kernel, "out": weight.out_features, "in": weight.in_features}
    if isinstance(weight, Int8Weight):
        return {"kind": "int8", **entry}
    if isinstance(weight, Int4Weight):
        return {"kind": "int4", "group": weight.group, **entry}
    raise TypeError(f"cannot cache a weight of type {type(weight).__name__}")


def _rebuild(entry: dict, name: str, tensors: dict[str, torch.Tensor]):
    kind, kernel = entry["kind"], entry["kernel"]
    matmul = None
    if kernel != "torch":
        _, module = our_module(torch.float32 if kernel == "avx2" else torch.bfloat16)
        matmul = getattr(module, _KERNEL_FUNCTIONS[kind, kernel])
    if kind == "mixed":
        parts = tuple(_rebuild(part, f"{name}.{i}", tensors) for i, part in enumerate(entry["parts"]))
        return MixedWeight(parts=parts, matmul=matmul, kernel=kernel)
    packed, scales = tensors[f"{name}.packed"], tensors[f"{name}.scales"]
    if kind == "int8":
        return Int8Weight(packed=packed, scales=scales, out_features=entry["out"], in_features=entry["in"],
                          matmul=matmul, kernel=kernel)
    return Int4Weight(packed=packed, scales=scales, group=entry["group"], out_features=entry["out"],
                      in_features=entry["in"], kernel=kernel, matmul=matmul)


_ABANDONED_SECONDS = 24 * 3600  # a temporary file this old was left by a writer that died
INSTALLATION = str(Path(__file__).resolve().parent)  # part of every file's key, and recorded in it


def _orphans(directory: Path) -> list[Path]:
    """Files written by an installation that no longer exists (a removed checkout, a CI clone): only
    that installation's key could read them. Files written before this was recorded are kept."""
    from safetensors import safe_open

    orphans = []
    for path in directory.glob("*.safetensors"):
        try:
            with safe_open(str(path), framework="pt") as handle:
                installation = (handle.metadata() or {}).get("installation")
        except Exception:  # a damaged file: load() ignores it, and its own next save replaces it
            continue
        if installation and not Path(installation).is_dir():
            orphans.append(path)
    return orphans


def save(path: Path, layers: list[dict], head=None) -> None:
    """Write ``layers`` (``native.int4_layer_weights``' result) and an 8-bit LM ``head`` (or None) to
    ``path`` atomically, readable as the user's umask allows. Any failure (a full or read-only disk, a
    weight it cannot describe) is logged, not raised: the model still runs, the next load packs again."""
    from safetensors.torch import save_file

    tmp = None
    try:
        tensors: dict[str, torch.Tensor] = {}
        layout = {"layers": [{name: _describe(weight, f"layers.{i}.{name}", tensors) for name, weight in layer.items()}
                             for i, layer in enumerate(layers)],
                  "head": None if head is None else _describe(head, "head", tensors)}
        path.parent.mkdir(parents=True, exist_ok=True)
        for old in path.parent.glob(".*.safetensors.*"):  # temporaries of writers that died
            try:
                if time.time() - old.stat().st_mtime > _ABANDONED_SECONDS:
                    old.unlink()
            except OSError:
                pass
        handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(handle)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o644 & ~umask)  # mkstemp makes it private
        save_file(tensors, tmp, metadata={"format": FORMAT, "layout": json.dumps(layout), "installation": INSTALLATION})
        os.replace(tmp, path)
        tmp = None
        for stale in _stale_versions(path) + _orphans(path.parent):  # they can never be read again
            stale.unlink(missing_ok=True)
        log.info("saved packed weights to %s (later loads skip grid recovery)", path)
    except Exception as exc:  # safetensors, the file system and _describe raise many types
        log.warning("could not save packed weights to %s: %s", path, exc)
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def load(path: Path, num_layers: int) -> tuple[list[dict], object] | None:
    """The (layers, head) saved at ``path`` for a model of ``num_layers`` decoder layers, or None when
    there is no such file or it cannot be used (unreadable, another format, another layer count, a
    kernel that is not available here: logged)."""
    if not path.is_file():
        return None
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise ValueError(f"format {metadata.get('format')!r}, expected {FORMAT}")
        layout = json.loads(metadata["layout"])
        if len(layout["layers"]) != num_layers:
            raise ValueError(f"{len(layout['layers'])} layers, the model has {num_layers}")
        tensors = load_file(str(path))
        layers = [{name: _rebuild(entry, f"layers.{i}.{name}", tensors) for name, entry in layer.items()}
                  for i, layer in enumerate(layout["layers"])]
        head = None if layout["head"] is None else _rebuild(layout["head"], "head", tensors)
    except Exception as exc:  # safetensors and json raise many types for damaged files
        log.warning("ignoring the packed-weight cache %s: %s", path, exc)
        return None
    return layers, head

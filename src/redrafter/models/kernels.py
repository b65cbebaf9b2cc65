"""Our CPU kernels (``csrc/``): built once on the machine, loaded on demand.

- ``int4_mm`` / ``pack_weight`` (``csrc/int4_gemm.cpp``): products of a few bf16 rows with a 4-bit
  weight. torch's CPU int4 kernel (``aten._weight_int4pack_mm_for_cpu``) works through the rows in
  blocks of 4 and streams and unpacks the whole weight once per block, so 5 rows cost about twice 4
  (the "int4 cliff" in docs/PERFORMANCE.md). Ours walks the weight once: each tile of 16 output
  features is unpacked from 4-bit to bf16 (a 32-entry table lookup, ``vpermw``) and multiplied into
  every row with ``vdpbf16ps`` while it sits in L1, so 16 rows cost about 3x one row where torch's
  kernel costs 4.6x (SmolLM2's 30 layers, docs/PERFORMANCE.md). Steps and lows are float16 where
  that holds the grid (``int4.float16_scales``), else float32.
- ``tree_attention`` (``csrc/tree_attention.cpp``): attention of a few new tokens per row over the
  KV cache with an explicit mask (a tree being verified), float32 arithmetic, in one call per layer.
- ``bf16_mm`` (``csrc/bf16_gemm.cpp``): products of up to 8 bf16 rows with a bf16 weight packed in
  pairs of inputs (``base.pack_bf16``), one pass over the weight; a drafter's small layers run it.
- ``cache_attention``: ``tree_attention`` over one layer of the whole cache, with no views made in Python.
- ``rope_store`` and ``silu_mul`` (``csrc/layer_ops.cpp``): a layer's rotary embedding with its cache
  write (bit-identical to the tensor operations), and ``F.silu(gate) * up`` (the same roundings; our
  exp can move a SiLU by its last bit).
- ``rms_norm_bf16`` (``csrc/rms_norm.cpp``): transformers' RMSNorm of bf16 rows in one call, bit-identical
  to the eight tensor operations it replaces.
- ``cap_tree_scored``, ``pack_tree``, ``greedy_accept``, ``sampled_accept`` (``csrc/tree.cpp``): a
  speculative step's tree bookkeeping (tree.py's cap and pack, verify.py's greedy and sampling walks)
  in one call each, with results equal to the tensor versions'.
- ``beam_select`` (``csrc/beam_select.cpp``): one depth of the drafter's beam search after its logits
  (log-softmax, scores, the best W extensions) in one pass. Its exp is a polynomial and its sums run
  in another order, so scores can differ from torch's in the last bits and a near-tie can pick
  another draft token: drafts only, the output stays exact.
- ``draft_search`` (``csrc/draft_search.cpp``): the drafter's whole beam search in one call, for a
  drafter whose layers all run our int4 products (``drafter.model.FusedSearch``): the Python loop's
  products and roundings, bit for bit, without its per-depth tensor operations; ``draft_step`` is
  one depth of it (next state and logits) for the loop that draws sampled drafts. This extension runs
  them for bf16 drafters (``int4_mm``); the AVX2 one below builds the same two files for float32
  drafters (``mm_f32``, 8 lanes).

They need AVX-512 BW and AVX-512 BF16 (Zen 4, Sapphire Rapids and later), a C++ compiler and ninja;
elsewhere ``load()`` returns None and the model uses torch's kernels. A second extension,
``csrc/avx2`` (``load_avx2``), runs float32 models on any CPU with AVX2, FMA and F16C: 4- and 8-bit
products, attention, the rotary embedding with its cache write, RMSNorm, SiLU x up, the decoder
in one call, the tree bookkeeping, and the drafter's beam selection and search (docs/PERFORMANCE.md,
"CPUs without AVX-512").

The build (about 40 s on 2 cores) happens once and is cached under ``REDRAFTER_KERNEL_CACHE``
(default ``~/.cache/redrafter/kernels``), keyed by the sources and torch's version; ``make install``
runs it (``python -m redrafter.models.kernels``). ``REDRAFTER_INT4_KERNEL=torch`` turns off our int4
products, ``REDRAFTER_ATTENTION_KERNEL=torch`` our attention (with the rotary/cache and SiLU calls) and ``REDRAFTER_TREE_KERNEL=torch`` our tree
bookkeeping (``int4_unavailable_reason``, ``attention_unavailable_reason``, ``tree_unavailable_reason``).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
from pathlib import Path

import torch

SOURCE_NAMES = ("int4_gemm.cpp", "tree_attention.cpp", "layer_ops.cpp", "rms_norm.cpp", "bf16_gemm.cpp", "tree.cpp", "beam_select.cpp",
                "draft_search.cpp", "decoder.cpp", "bindings.cpp")
SOURCES = [Path(__file__).with_name("csrc") / name for name in SOURCE_NAMES]
HEADERS = [Path(__file__).with_name("csrc") / name for name in ("vec.h", "tree.h", "draft.h")]  # part of the cache key, not compiled on their own
REQUIRED_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16")
COMPILE_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma", "-fopenmp"]

log = logging.getLogger(__name__)


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux reports them (empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


AVX2_SOURCES = [Path(__file__).with_name("csrc") / "avx2" / name for name in ("gemm_f32.cpp", "layer_f32.cpp")] + [
    # the tree bookkeeping (with its AVX2 argmax) and the drafter's search, float32 here
    Path(__file__).with_name("csrc") / name for name in ("tree.cpp", "beam_select.cpp", "draft_search.cpp")]
AVX2_HEADERS = [Path(__file__).with_name("csrc") / name for name in ("tree.h", "draft.h", "avx2/vec_f32.h")]
AVX2_REQUIRED_FLAGS = ("avx2", "fma", "f16c")
# REDRAFTER_AVX2: the sources both extensions build take their 8-lane paths (not __AVX512F__, which a
# -march=native in CFLAGS on an AVX-512 CPU would define)
AVX2_COMPILE_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-DREDRAFTER_AVX2"]


def unavailable_reason(required: tuple[str, ...] = REQUIRED_FLAGS) -> str | None:
    """Why kernels needing the CPU flags ``required`` cannot run here, or None when they can be built and run."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return f"not an x86-64 CPU ({platform.machine()})"
    missing = [flag for flag in required if flag not in cpu_flags()]
    if missing:
        return f"the CPU lacks {', '.join(missing)}"
    return None


def cache_dir(sources: list[Path] | None = None, prefix: str = "cpu") -> Path:
    """Where a built extension lives: one directory per source text, compiler flags and torch version."""
    root = Path(os.environ.get("REDRAFTER_KERNEL_CACHE", Path.home() / ".cache" / "redrafter" / "kernels"))
    text = b"".join(path.read_bytes() for path in (SOURCES + HEADERS if sources is None else sources))
    flags = " ".join(COMPILE_FLAGS if prefix == "cpu" else AVX2_COMPILE_FLAGS).encode()
    key = hashlib.sha256(text + flags + torch.__version__.encode()).hexdigest()[:16]
    return root / f"{prefix}-{key}"


def _build(name: str, sources: list[Path], flags: list[str], directory: Path):
    """Build (or load the cached build of) one extension; None when the build fails (logged)."""
    from torch.utils import cpp_extension

    directory.mkdir(parents=True, exist_ok=True)
    if not any(directory.glob("*.so")):
        log.warning("building our CPU kernels in %s (once per machine, about a minute)", directory)
    try:
        return cpp_extension.load(name, [str(path) for path in sources], extra_cflags=flags,
                                  extra_ldflags=["-fopenmp"], build_directory=str(directory), verbose=False)
    except Exception as exc:  # no compiler or ninja, an old assembler: fall back, loudly
        log.warning("CPU kernels (%s): the build failed, using torch's (%s)", name,
                    str(exc).strip().splitlines()[-1:])
        return None


@functools.cache
def load():
    """The compiled AVX-512 extension (the functions listed above), building it on first use; None
    when the machine cannot run it or the build fails (logged once; torch's kernels run)."""
    reason = unavailable_reason()
    if reason is not None:
        log.info("CPU kernels: torch's (%s)", reason)
        return None
    try:
        directory = cache_dir()
    except OSError as exc:  # a source file missing from the installed package
        log.warning("CPU kernels: sources missing, using torch's (%s)", exc)
        return None
    return _build("redrafter_kernels", SOURCES, COMPILE_FLAGS, directory)


@functools.cache
def load_avx2():
    """The compiled AVX2 extension for float32 models (csrc/avx2): ``mm_f32`` and ``mixed_mm_f32``
    (float32 rows through 4- and 8-bit weights, packed by ``pack_weight_f32`` / ``pack_weight8_f32``),
    ``rms_norm_f32``, ``rope_store_f32``, ``attention_f32``, ``silu_mul_f32``, ``decoder_layers_f32``,
    the tree bookkeeping (csrc/tree.cpp) and ``beam_select``, ``draft_search`` and ``draft_step`` for
    float32 drafters; built on first use. None where the CPU lacks AVX2/FMA/F16C or the build fails."""
    reason = unavailable_reason(AVX2_REQUIRED_FLAGS)
    if reason is not None:
        log.info("float32 CPU kernels: torch's (%s)", reason)
        return None
    try:
        directory = cache_dir(AVX2_SOURCES + AVX2_HEADERS, "avx2")
    except OSError as exc:  # a source file missing from the installed package
        log.warning("float32 CPU kernels: sources missing, using torch's (%s)", exc)
        return None
    return _build("redrafter_kernels_avx2", AVX2_SOURCES, AVX2_COMPILE_FLAGS, directory)


def avx2_unavailable_reason() -> str | None:
    """Why our float32 4- and 8-bit products cannot run here (None when they can; the build may still
    fail): ``REDRAFTER_INT4_KERNEL=torch``, or the CPU."""
    return switched_off("REDRAFTER_INT4_KERNEL") or unavailable_reason(AVX2_REQUIRED_FLAGS)


def avx2():
    """The AVX2 extension for float32 4- and 8-bit products, or None (``avx2_unavailable_reason``, or a
    failed build)."""
    return None if avx2_unavailable_reason() is not None else load_avx2()


def avx2_layers_unavailable_reason() -> str | None:
    """Why our float32 attention, rotary/cache write, RMSNorm and SiLU x up cannot run here (None when
    they can): ``REDRAFTER_ATTENTION_KERNEL=torch``, or the CPU."""
    return switched_off("REDRAFTER_ATTENTION_KERNEL") or unavailable_reason(AVX2_REQUIRED_FLAGS)


def avx2_layers():
    """The AVX2 extension for a float32 layer's attention, rotary/cache write, RMSNorm and SiLU x up, or
    None (``avx2_layers_unavailable_reason``, or a failed build)."""
    return None if avx2_layers_unavailable_reason() is not None else load_avx2()


def switched_off(variable: str) -> str | None:
    """The reason "<variable>=torch" when that environment variable turns one of our kernels off, else None."""
    return f"{variable}=torch" if os.environ.get(variable, "auto") == "torch" else None


def int4_unavailable_reason() -> str | None:
    """Why our int4 products cannot run here (None when they can; the build may still fail)."""
    return switched_off("REDRAFTER_INT4_KERNEL") or unavailable_reason()


def attention_unavailable_reason() -> str | None:
    """Why our tree attention cannot run here (None when it can; the build may still fail)."""
    return switched_off("REDRAFTER_ATTENTION_KERNEL") or unavailable_reason()


def int4():
    """The extension for int4 products, or None (``int4_unavailable_reason``, or a failed build)."""
    return None if int4_unavailable_reason() is not None else load()


def attention():
    """The extension for tree attention, or None (``attention_unavailable_reason``, or a failed build)."""
    return None if attention_unavailable_reason() is not None else load()


def tree_unavailable_reason() -> str | None:
    """Why our tree bookkeeping cannot run here (None when it can; the build may still fail): it runs
    in the AVX-512 extension, else in the AVX2 one."""
    if unavailable_reason() is not None and unavailable_reason(AVX2_REQUIRED_FLAGS) is None:
        return switched_off("REDRAFTER_TREE_KERNEL")
    return switched_off("REDRAFTER_TREE_KERNEL") or unavailable_reason()


def tree():
    """The extension for tree bookkeeping on CPU tensors (tree.py, verify.py), or None
    (``tree_unavailable_reason``, or a failed build): the tensor versions run then. Asked four times
    per step, so the answer is kept per value of ``REDRAFTER_TREE_KERNEL`` (1 µs instead of 15)."""
    return _tree_for(os.environ.get("REDRAFTER_TREE_KERNEL", "auto"))


@functools.cache
def _tree_for(setting: str):
    if tree_unavailable_reason() is not None:
        return None
    return load() if unavailable_reason() is None else load_avx2()


def main() -> int:
    """Build (or find) the kernels and say whether they will be used."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    module = load()
    if module is None:
        print(f"CPU kernels (bfloat16): not available ({unavailable_reason() or 'build failed'}); torch's kernels are used")
    else:
        print(f"CPU kernels (bfloat16): ready in {cache_dir()}")
    module = load_avx2()
    if module is None:
        print(f"CPU kernels (float32 int4): not available ({unavailable_reason(AVX2_REQUIRED_FLAGS) or 'build failed'})")
    else:
        print(f"CPU kernels (float32 int4): ready in {cache_dir(AVX2_SOURCES + AVX2_HEADERS, 'avx2')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

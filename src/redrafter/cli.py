"""``redrafter`` command line: a thin argparse layer that calls the library with keywords."""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
from pathlib import Path
from typing import Sequence

from redrafter.config import BeamConfig, GenerationConfig
from redrafter.errors import RedrafterError

DEFAULT_BEAM = BeamConfig()
DEFAULT_MAX_NEW_TOKENS = 256
DEFAULT_DRAFT_MODE = "sample"  # measured against "beam" in docs/BENCHMARKS.md (sampling)
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")  # prompts files read as JSONL whatever their first line


def read_prompts(prompts: Sequence[str] | None, prompts_file: str | None) -> list[str]:
    """Prompts from ``--prompt`` values and/or a prompts file (``prompt_records``)."""
    result = list(prompts or [])
    if prompts_file is not None:
        result += [record["prompt"] for record in prompt_records(prompts_file)]
    if not result:
        raise RedrafterError("no prompt given: use --prompt TEXT or --prompts-file FILE")
    for i, prompt in enumerate(result):
        if not prompt.strip():
            raise RedrafterError(f"prompt {i + 1} is empty")
    return result


def prompt_records(prompts_file: str) -> list[dict]:
    """A prompts file's prompts, as records with a string "prompt" (from JSONL, with the line's other
    fields too). UTF-8, with or without a byte-order mark; blank lines are skipped.

    JSONL (a .jsonl / .json / .ndjson file, or one whose first non-blank line is a JSON object): every
    line must be a JSON object with a non-blank string field "prompt". Otherwise plain text: every line is one
    prompt as it stands, a line that starts with "{" included."""
    path = Path(prompts_file)
    if path.is_dir():
        raise RedrafterError(f"prompts file {path} is a directory")
    if not path.is_file():
        raise RedrafterError(f"prompts file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise RedrafterError(f"prompts file {path} is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    lines = [(number, line) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not lines:
        raise RedrafterError(f"prompts file {path} holds no prompt")
    if not is_jsonl(path, lines[0][1]):
        return [{"prompt": line} for _, line in lines]
    records = []
    for number, line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RedrafterError(f"{path}:{number}: invalid JSON: {exc}") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise RedrafterError(f"{path}:{number}: JSON line has no string field \"prompt\"")
        if not record["prompt"].strip():
            raise RedrafterError(f"{path}:{number}: the prompt is empty")
        records.append(record)
    return records


def is_jsonl(path: Path, first_line: str) -> bool:
    """Whether a prompts file is JSONL: by its suffix, else by its first non-blank line."""
    if path.suffix.lower() in JSONL_SUFFIXES:
        return True
    if not first_line.lstrip().startswith("{"):
        return False
    try:
        return isinstance(json.loads(first_line), dict)
    except json.JSONDecodeError:
        return False


def encode_prompt(tokenizer, prompt: str, *, chat_template: bool) -> list[int]:
    """Token ids for a user prompt: one user turn through the chat template (see encode_messages)."""
    return encode_messages(tokenizer, [{"role": "user", "content": prompt}], chat_template=chat_template)


def encode_messages(tokenizer, messages: list[dict], *, chat_template: bool) -> list[int]:
    """Token ids for a conversation: through the model's chat template with the generation prompt,
    unless disabled or absent; then the turns' text is joined raw, with the tokenizer's special tokens."""
    if chat_template and tokenizer.chat_template:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False).input_ids
    return tokenizer("\n\n".join(m["content"] for m in messages)).input_ids


def stop_token_ids(tokenizer, target) -> tuple[int, ...]:
    """EOS from the model's generation config, the tokenizer's EOS, and a chat end token if any."""
    ids = set(target.info.stop_token_ids)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    for token in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    return tuple(sorted(ids))


class TextStream:
    """Incremental detokenization: the text added by each new batch of tokens."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.tokens, self.text = tokenizer, [], ""

    def push(self, token_ids: Sequence[int]) -> str:
        self.tokens.extend(token_ids)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next tokens
            return ""
        delta = text[len(self.text):] if text.startswith(self.text) else text
        self.text = text
        return delta


def resolve_drafter(model_spec: str, drafter: str | None) -> Path:
    """The drafter to use: ``--drafter DIR`` if given, else the one shipped for an embedded model."""
    from redrafter.models.loading import check_model_spec, shipped_drafter

    if drafter is not None:
        if Path(drafter).exists() and not Path(drafter).is_dir():
            raise RedrafterError(f"--drafter {drafter} is a file; a drafter is a directory (config.json + "
                                 "model.safetensors)")
        if not Path(drafter).is_dir():
            raise RedrafterError(f"drafter directory not found: {drafter}")
        return Path(drafter)
    check_model_spec(model_spec)  # a bad --model is reported as such, not as a missing drafter
    shipped = shipped_drafter(model_spec)
    if shipped is None:
        raise RedrafterError(f"no drafter ships for model '{model_spec}': pass --drafter DIR (train one with "
                             "'redrafter datagen' and 'redrafter train'), or --autoregressive for plain decoding")
    return shipped


def beam_format(target) -> str:
    """The key of a drafter's stored beam setting for ``target`` (``recommended_beam``): its weight
    format, and for int4 without our AVX-512 kernel "int4:avx2" (our float32 kernel, whose trees cost
    nearly in proportion to their tokens) or "int4:torch" (whose trees of 5+ tokens cost a second pass)."""
    weights = getattr(target, "weights", "dense")
    kernels = getattr(target, "int4_kernels", [])
    if weights == "int4" and "avx512" not in kernels:
        return "int4:avx2" if "avx2" in kernels else "int4:torch"
    return weights


def resolve_beam(width: int | None, length: int | None, drafter_path, min_prob: float | None = None,
                 max_tree_tokens: int | None = None, weights: str = "dense", lookup_tokens: int | None = None,
                 lookup_ngram: int | None = None, *, sampling: bool = False,
                 min_tokens_per_step: float | None = None, extend_prob: float | None = None) -> BeamConfig:
    """Explicit flags win, then the drafter's stored best setting for the target's weight format
    (``weights``, ``beam_format``; ``sampling``: the setting measured for temperature > 0), then the
    built-in default.

    A stored tree cap and probability floor were measured for the stored W x L only: an explicit width or
    length without ``max_tree_tokens`` (``min_prob``) verifies the whole tree (with no floor). The
    context-lookup beam keeps its stored setting, with ``extend_prob``, under a cap; in a whole tree
    (no cap) it gets a beam's length, L - 1 tokens, and nothing is verified past the tree, since a
    stored lookup length (32 for the shipped drafter) was measured with the cap choosing among its
    tokens."""
    from redrafter.drafter.model import recommended_beam

    base = recommended_beam(drafter_path, weights, sampling) or DEFAULT_BEAM
    stored_shape = width is None and length is None
    if max_tree_tokens is None:
        max_tree_tokens = base.max_tree_tokens if stored_shape else 0
    if min_prob is None:
        min_prob = base.min_prob if stored_shape else 0.0
    length = base.length if length is None else length
    whole_tree = not stored_shape and max_tree_tokens == 0
    if lookup_tokens is None:
        lookup_tokens = min(base.lookup_tokens, length - 1) if whole_tree else base.lookup_tokens
    if extend_prob is None:
        extend_prob = 0.0 if whole_tree else base.extend_prob
    return BeamConfig(width=base.width if width is None else width, length=length,
                      min_prob=min_prob, max_tree_tokens=max_tree_tokens, lookup_tokens=lookup_tokens,
                      lookup_ngram=base.lookup_ngram if lookup_ngram is None else lookup_ngram,
                      min_tokens_per_step=(base.min_tokens_per_step if min_tokens_per_step is None
                                           else min_tokens_per_step),
                      extend_prob=extend_prob)


def add_draft_shape_arguments(parser, *, multiple: bool = False) -> None:
    """--beam-width, --beam-length, --min-draft-prob and --max-tree-tokens (generate and bench)."""
    parser.add_argument("--beam-width", type=int, default=None,
                        help=f"W, number of beams (default: the drafter's measured best, else {DEFAULT_BEAM.width})")
    parser.add_argument("--beam-length", type=int, default=None,
                        help="L, tokens per beam counting the target's own token, L-1 drafted (default: the "
                             f"drafter's measured best, else {DEFAULT_BEAM.length})")
    parser.add_argument("--min-draft-prob", default=None, metavar="P", help=(
        "adaptive draft: verify only the tree nodes whose drafter probability (the product of q along the "
        "path; for a looked-up token how often a copy after its match length is right) is at least P, possibly none but g0, and of those at most "
        "--max-tree-tokens (beam-search drafts only; 0 = the whole tree; default: the drafter's measured "
        "best when --beam-width and --beam-length are not given, else 0; 0.15 for the shipped drafter with "
        "our int4 kernel, greedy)" + (" (a comma list runs each)" if multiple else "")))
    parser.add_argument("--max-tree-tokens", default=None, metavar="N", help=(
        "verify at most N tree tokens per step (g0 included): the N nodes of the beams' tree most probable "
        "under the drafter (beam-search drafts only; 0 = all; default: the drafter's measured best when "
        "--beam-width and --beam-length are not given, else 0)"
        + (" (a comma list runs each)" if multiple else "")))
    parser.add_argument("--lookup-tokens", default=None, metavar="N", help=(
        "context lookup: also verify, as one more beam, the up to N tokens that followed the last earlier "
        "occurrence of the row's last n tokens in its prompt and output (0 = off; default: the drafter's "
        "measured best, else 0)" + (" (a comma list runs each)" if multiple else "")))
    parser.add_argument("--min-tokens-per-step", default=None, metavar="X", help=(
        "speculate only while it pays: a row whose speculative steps emit fewer than X tokens on average "
        "(a running mean) takes plain decode steps, trying a speculative one every 8th step (0 = always "
        "speculate; default: the drafter's measured setting, else 0; 0 for the shipped drafter)"
        + (" (a comma list runs each)" if multiple else "")))
    parser.add_argument("--extend-prob", default=None, metavar="P", help=(
        "verify past --max-tree-tokens every node at least this likely to be accepted (a looked-up stretch "
        "of a loop the model repeats, scored by how long its match is), up to 64 tree tokens (0 = never; "
        "default: the drafter's measured setting, else 0)" + (" (a comma list runs each)" if multiple else "")))
    parser.add_argument("--drafter-weights", default="auto", metavar="auto|dense|int4", help=(
        "the drafter's products: int4 rounds its weights to 4 bits per group of 32 inputs and runs them "
        "with our kernel (a bf16 drafter on an AVX-512-BF16 CPU; drafting gets cheaper, the output stays "
        "exact), dense keeps them as loaded, auto: int4 where it runs" + (" (a comma list runs each)" if multiple else "")))
    parser.add_argument("--lookup-ngram", type=int, default=None, metavar="N",
                        help="longest n-gram the context lookup matches, trying shorter ones down to 1 "
                             f"(default: the drafter's measured best, else {DEFAULT_BEAM.lookup_ngram})")


def max_tree_tokens_values(value: str | None) -> list[int | None]:
    """Parse --max-tree-tokens (None = the drafter's default; a comma list for bench)."""
    return comma_values(value, int, lambda v: v == 0 or v >= 2,
                        "--max-tree-tokens must be 0 (no cap) or an integer >= 2")


def lookup_tokens_values(value: str | None) -> list[int | None]:
    """Parse --lookup-tokens (None = the drafter's default; a comma list for bench)."""
    return comma_values(value, int, lambda v: v >= 0, "--lookup-tokens must be an integer >= 0 (0 = off)")


def min_tokens_values(value: str | None) -> list[float | None]:
    """Parse --min-tokens-per-step (None = the drafter's default; a comma list for bench)."""
    return comma_values(value, float, lambda v: v == 0 or v >= 1,
                        "--min-tokens-per-step must be 0 (always speculate) or a number >= 1")


def drafter_weights_values(value: str) -> list[str]:
    """Parse --drafter-weights (a comma list for bench)."""
    from redrafter.drafter.model import DRAFTER_WEIGHTS

    return comma_values(value, str.strip, lambda v: v in DRAFTER_WEIGHTS,
                        f"--drafter-weights takes {', '.join(DRAFTER_WEIGHTS)}")


def min_draft_probs(value: str | None) -> list[float | None]:
    """Parse --min-draft-prob (None = the drafter's default; a comma list for bench)."""
    return comma_values(value, float, lambda v: 0.0 <= v < 1.0, "--min-draft-prob must be a probability in [0, 1)")


def extend_probs(value: str | None) -> list[float | None]:
    """Parse --extend-prob (None = the drafter's default; a comma list for bench)."""
    return comma_values(value, float, lambda v: 0.0 <= v < 1.0, "--extend-prob must be a probability in [0, 1)")


def single(values: list, flag: str, value: str | None):
    """The one value of a comma-list flag that generate takes once."""
    if len(values) != 1:
        raise RedrafterError(f"{flag} takes one value for generate, got '{value}'")
    return values[0]


def comma_values(value: str | None, parse, valid, message: str) -> list:
    """A flag's comma list parsed by ``parse``, each value passing ``valid``; [None] when not given."""
    if value is None:
        return [None]
    try:
        values = [parse(v) for v in value.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or not all(valid(v) for v in values):
        raise RedrafterError(f"{message}, got '{value}'")
    return values


def add_sampling_arguments(parser, *, multiple: bool = False, seed: int | None = None) -> None:
    """--temperature, --top-k, --top-p, --seed (default ``seed``: None draws a random one per run) and
    --draft-mode."""
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus: smallest set with this mass (1 = off)")
    parser.add_argument("--seed", type=int, default=seed, help=(
        "sampling seed: the same seed gives the same samples; prompt i uses random stream i (default: "
        + ("a random seed, so each run samples afresh)" if seed is None else f"{seed})")))
    parser.add_argument("--draft-mode", default=DEFAULT_DRAFT_MODE, help=(
        "how the drafter drafts when sampling (all exact): beam = its beam search, each child tested as "
        "a point mass; sample = W paths drawn from its q; tree = a tree whose siblings are drawn from q "
        "without replacement" + (" (bench: a comma list runs each)" if multiple else "")
        + f"; default {DEFAULT_DRAFT_MODE}"))


def draft_modes(value: str) -> list[str]:
    """Parse --draft-mode (one mode, or a comma list for bench)."""
    from redrafter.engine import DRAFT_MODES

    modes = [m.strip() for m in value.split(",") if m.strip()]
    bad = [m for m in modes if m not in DRAFT_MODES]
    if bad or not modes:
        raise RedrafterError(f"--draft-mode must be one of {', '.join(DRAFT_MODES)}, got '{value}'")
    return modes


def sampling_params(args: argparse.Namespace):
    from redrafter.config import SamplingParams

    # Without --seed, a random one, chosen here so that --json records it and a run can be repeated.
    seed = secrets.randbits(31) if args.seed is None else args.seed
    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=seed)


def add_generate_parser(subparsers) -> None:
    from redrafter.models.loading import add_backend_arguments

    p = subparsers.add_parser("generate", help="generate text with ReDrafter (or plain decoding)")
    p.add_argument("--model", default=None, help="embedded model name, transformers directory, or .gguf file "
                                                 "(default: the embedded smollm2-135m-instruct)")
    p.add_argument("--drafter", default=None, help="drafter directory (config.json + model.safetensors); "
                                                   "default: the drafter shipped for the embedded model")
    p.add_argument("--prompt", action="append", nargs="+", default=None, metavar="TEXT",
                   help="a prompt; repeat or give several for several prompts")
    p.add_argument("--prompts-file", default=None, metavar="FILE",
                   help='JSONL with a "prompt" field per line, or plain text with one prompt per line')
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    add_draft_shape_arguments(p)
    p.add_argument("--autoregressive", action="store_true", help="plain decoding on the same backend, no drafter")
    add_backend_arguments(p)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--no-chat-template", action="store_true", help="feed the prompt as raw text")
    add_sampling_arguments(p)
    p.add_argument("--json", action="store_true", help="one JSON object per prompt on stdout")
    p.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    import torch

    from redrafter.drafter.model import load_drafter
    from redrafter.engine import Engine, FinishEvent, ReDrafterProposer, TokensEvent
    from redrafter.models.loading import DEFAULT_MODEL, load_target

    if args.max_new_tokens < 1:
        raise RedrafterError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    prob = single(min_draft_probs(args.min_draft_prob), "--min-draft-prob", args.min_draft_prob)
    cap = single(max_tree_tokens_values(args.max_tree_tokens), "--max-tree-tokens", args.max_tree_tokens)
    lookup = single(lookup_tokens_values(args.lookup_tokens), "--lookup-tokens", args.lookup_tokens)
    gate = single(min_tokens_values(args.min_tokens_per_step), "--min-tokens-per-step", args.min_tokens_per_step)
    extend = single(extend_probs(args.extend_prob), "--extend-prob", args.extend_prob)
    resolve_beam(args.beam_width, args.beam_length, None, prob, cap, lookup_tokens=lookup, lookup_ngram=args.lookup_ngram,
                 min_tokens_per_step=gate, extend_prob=extend)  # bad flags fail before anything loads
    prompts = read_prompts([t for group in args.prompt or [] for t in group], args.prompts_file)
    drafter_path = None if args.autoregressive else resolve_drafter(args.model or DEFAULT_MODEL, args.drafter)
    if args.autoregressive and args.drafter is not None:
        print("note: --drafter is not used with --autoregressive", file=sys.stderr)
    # A bad drafter fails before the model loads (its own size is small; it moves to the model's
    # device and dtype below, with the same values as loading it there).
    drafter = None if drafter_path is None else load_drafter(drafter_path)
    if args.threads is not None:
        if args.threads < 1:
            raise RedrafterError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    sampling = sampling_params(args)
    modes = draft_modes(args.draft_mode)
    if len(modes) != 1:
        raise RedrafterError(f"--draft-mode takes one mode for generate, got '{args.draft_mode}'")
    draft_mode = modes[0]
    drafter_weights = single(drafter_weights_values(args.drafter_weights), "--drafter-weights", args.drafter_weights)

    target, tokenizer = load_target(args.model or DEFAULT_MODEL, dtype=args.dtype, device=args.device,
                                    backend=args.backend, compile=args.compile, keep_transformers_model=False,
                                    weights=args.weights, int4_kernel=args.int4_kernel,
                                    attention_kernel=args.attention_kernel)
    proposer = None
    if not args.autoregressive:
        beam = resolve_beam(args.beam_width, args.beam_length, drafter_path, prob, cap, beam_format(target),
                            lookup, args.lookup_ngram, sampling=sampling.temperature > 0,
                            min_tokens_per_step=gate, extend_prob=extend)
        drafter = drafter.to(device=target.device, dtype=target.dtype)
        proposer = ReDrafterProposer(drafter, target, beam, draft_mode=draft_mode, drafter_weights=drafter_weights)
    engine = Engine(target, proposer)
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, stop_token_ids=stop_token_ids(tokenizer, target),
                              sampling=sampling)

    encoded = [encode_prompt(tokenizer, prompt, chat_template=not args.no_chat_template) for prompt in prompts]
    engine.check(encoded, config)  # every prompt before the first is answered
    for index, (prompt, ids) in enumerate(zip(prompts, encoded)):
        stream = TextStream(tokenizer)
        for event in engine.generate([ids], config, row_offset=index):
            if isinstance(event, TokensEvent) and not args.json:
                sys.stdout.write(stream.push(event.token_ids))
                sys.stdout.flush()
            elif isinstance(event, FinishEvent):
                stats = event.stats
                if args.json:
                    record = {
                        "prompt": prompt,
                        "text": tokenizer.decode(list(event.token_ids), skip_special_tokens=True),
                        "token_ids": list(event.token_ids),
                        "num_prompt_tokens": stats.num_prompt_tokens,
                        "num_new_tokens": stats.num_new_tokens,
                        "num_steps": stats.num_steps,
                        "tokens_per_step": round(stats.tokens_per_step, 4) if stats.num_steps else None,
                        "tree_tokens_per_step": round(stats.tree_tokens_per_step, 4) if stats.num_steps else None,
                        "elapsed_s": round(stats.elapsed_s, 4),
                        "first_token_s": round(stats.first_token_s, 4),
                        "tokens_per_s": round(stats.tokens_per_s, 3),
                        "finish_reason": event.reason,
                        "mode": "autoregressive" if args.autoregressive else "redrafter",
                        "beam_width": None if args.autoregressive else beam.width,
                        "beam_length": None if args.autoregressive else beam.length,
                        "min_draft_prob": None if args.autoregressive else beam.min_prob,
                        "max_tree_tokens": None if args.autoregressive else beam.max_tree_tokens,
                        "lookup_tokens": None if args.autoregressive else beam.lookup_tokens,
                        "lookup_ngram": None if args.autoregressive else beam.lookup_ngram,
                        "extend_prob": None if args.autoregressive else beam.extend_prob,
                        "temperature": sampling.temperature,
                        "top_k": None if sampling.greedy else sampling.top_k,
                        "top_p": None if sampling.greedy else sampling.top_p,
                        "seed": None if sampling.greedy else sampling.seed,
                        "draft_mode": None if args.autoregressive or sampling.greedy else draft_mode,
                        "dtype": str(target.dtype).removeprefix("torch."),
                        "backend": type(target).__name__,
                        "weights": target.weights,
                        "threads": torch.get_num_threads(),
                    }
                    print(json.dumps(record, ensure_ascii=False), flush=True)
                else:
                    sys.stdout.write("\n")
                    sys.stdout.flush()
                    tau = f"{stats.tokens_per_step:.2f}" if stats.num_steps else "n/a"
                    print(f"[{stats.num_new_tokens} tokens, {stats.num_steps} steps, tau={tau} tokens/step, "
                          f"{stats.tokens_per_s:.1f} tokens/s, {stats.elapsed_s:.2f} s, {event.reason}]",
                          file=sys.stderr, flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from redrafter.bench.cli import add_bench_parser
    from redrafter.bench.profile import add_profile_parser
    from redrafter.training.cli import add_datagen_parser, add_train_parser

    parser = argparse.ArgumentParser(prog="redrafter", description="ReDrafter speculative decoding")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_generate_parser(subparsers)
    add_bench_parser(subparsers)
    add_profile_parser(subparsers)
    add_datagen_parser(subparsers)
    add_train_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except RedrafterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of stdout went away (`... | head`): stop quietly, as SIGPIPE would
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush writes nowhere
        return 141


if __name__ == "__main__":
    sys.exit(main())

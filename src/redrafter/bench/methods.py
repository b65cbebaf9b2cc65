"""Decoding methods under benchmark, each a plug-in behind one small interface.

Every method takes the same prompt token ids and token budget and reports the generated ids, the
number of target forwards after the prefill (τ = (new tokens - 1) / steps, 1.0 for plain
decoding), the wall time and the time to the first token.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import time
from typing import Protocol, Sequence

import torch

from redrafter.config import BeamConfig, GenerationConfig, SamplingParams
from redrafter.drafter.model import inference_copy
from redrafter.engine import SAMPLED_DRAFT_MODES, Engine, FinishEvent, LookupProposer, ReDrafterProposer


@dataclasses.dataclass(frozen=True)
class RunResult:
    token_ids: list[int]
    num_steps: int  # target forwards after the prefill
    elapsed_s: float
    first_token_s: float | None
    num_tree_tokens: int | None = None  # tokens verified over all steps, g0 included (our engine only)


class Method(Protocol):
    name: str

    def run(self, prompt_ids: Sequence[int], max_new_tokens: int) -> RunResult: ...


@dataclasses.dataclass
class BenchContext:
    """What every method shares: one target, one tokenizer, one stop set, one numeric setting."""

    target: object  # a TargetModel; the transformers backend also exposes ``.model``
    tokenizer: object
    stop_token_ids: tuple[int, ...]
    gguf_path: str | None = None
    threads: int = 1
    sampling: SamplingParams = SamplingParams()


class EngineMethod:
    """Our engine: ``ar`` (no proposer) or ``redrafter[W=..,L=..]``; greedy or sampling (each run
    takes the next random stream of the seed)."""

    def __init__(self, name: str, engine: Engine, stop_token_ids: tuple[int, ...],
                 sampling: SamplingParams = SamplingParams()) -> None:
        self.name, self.engine, self.stop_token_ids, self.sampling = name, engine, stop_token_ids, sampling
        self.runs = 0

    def run(self, prompt_ids: Sequence[int], max_new_tokens: int) -> RunResult:
        config = GenerationConfig(max_new_tokens=max_new_tokens, stop_token_ids=self.stop_token_ids,
                                  sampling=self.sampling)
        self.runs += 1
        start = time.perf_counter()
        finish = next(e for e in self.engine.generate([list(prompt_ids)], config, row_offset=self.runs)
                      if isinstance(e, FinishEvent))
        elapsed = time.perf_counter() - start
        return RunResult(list(finish.token_ids), finish.stats.num_steps, elapsed, finish.stats.first_token_s,
                         finish.stats.num_tree_tokens)


class _FirstTokenClock:
    """A transformers streamer that notes when the first generated token arrives."""

    def __init__(self) -> None:
        self.calls, self.first = 0, None

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2 and self.first is None:  # call 1 is the prompt
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


class HFGenerateMethod:
    """transformers ``generate`` (greedy, or sampling with the same temperature / top-k / top-p),
    optionally with prompt lookup or an assistant model. Steps are counted as calls of the target
    model's forward minus the prefill."""

    def __init__(self, name: str, model, stop_token_ids: tuple[int, ...], pad_token_id: int | None,
                 sampling: SamplingParams = SamplingParams(), **generate_kwargs) -> None:
        self.name, self.model, self.stop_token_ids = name, model, stop_token_ids
        self.pad_token_id = pad_token_id if pad_token_id is not None else (stop_token_ids or (0,))[0]
        self.generate_kwargs = generate_kwargs
        if sampling.greedy:
            self.generate_kwargs["do_sample"] = False
        else:
            self.generate_kwargs.update(do_sample=True, temperature=sampling.temperature, top_k=sampling.top_k or None,
                                        top_p=sampling.top_p)

    def run(self, prompt_ids: Sequence[int], max_new_tokens: int) -> RunResult:
        calls = [0]
        handle = self.model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        ids = torch.tensor([list(prompt_ids)], device=self.model.device)
        clock = _FirstTokenClock()
        try:
            start = time.perf_counter()
            with torch.inference_mode():
                out = self.model.generate(ids, attention_mask=torch.ones_like(ids), num_beams=1,
                                          max_new_tokens=max_new_tokens, eos_token_id=list(self.stop_token_ids) or None,
                                          pad_token_id=self.pad_token_id, streamer=clock, **self.generate_kwargs)
            elapsed = time.perf_counter() - start
        finally:
            handle.remove()
        tokens = out[0, len(prompt_ids):].tolist()
        # generate pads finished sequences only in batches; cut after the first stop token anyway
        for i, token in enumerate(tokens):
            if token in self.stop_token_ids:
                tokens = tokens[: i + 1]
                break
        first = clock.first - start if clock.first is not None else None
        return RunResult(tokens, max(calls[0] - 1, 0), elapsed, first)


class LlamaCppMethod:
    """llama.cpp (llama-cpp-python) plain greedy decoding of the model's GGUF (quantized weights,
    so its tokens may differ from the dequantized model's)."""

    def __init__(self, name: str, gguf_path: str, stop_token_ids: tuple[int, ...], threads: int) -> None:
        from llama_cpp import Llama

        self.name, self.stop_token_ids = name, stop_token_ids
        self.llm = Llama(model_path=gguf_path, n_ctx=4096, n_threads=threads, n_threads_batch=threads,
                         verbose=False, seed=0)

    def run(self, prompt_ids: Sequence[int], max_new_tokens: int) -> RunResult:
        tokens: list[int] = []
        first = None
        self.llm.reset()
        start = time.perf_counter()
        for token in self.llm.generate(list(prompt_ids), top_k=1, top_p=1.0, min_p=0.0, temp=0.0,
                                       repeat_penalty=1.0, reset=True):
            if first is None:
                first = time.perf_counter() - start
            tokens.append(int(token))
            if token in self.stop_token_ids or len(tokens) >= max_new_tokens:
                break
        elapsed = time.perf_counter() - start
        return RunResult(tokens, max(len(tokens) - 1, 0), elapsed, first)


METHOD_NAMES = ("hf-generate", "ar", "redrafter", "lookup", "hf-prompt-lookup", "hf-assisted", "llamacpp")


def redrafter_name(beam: BeamConfig, draft_mode: str = "beam") -> str:
    """``redrafter[W=..,L=..]``, with ``,p>=..`` for an adaptive draft (--min-draft-prob), ``,K<=..`` for a capped
    tree, ``,look=..`` with the context-lookup beam, ``,gate=..`` with a speculation floor (--min-tokens-per-step),
    ``,ext>=..`` with sure nodes past the cap (--extend-prob) and ``,sample`` / ``,tree`` when drafts are drawn from q (sampling only)."""
    suffix = f",p>={beam.min_prob:g}" if beam.min_prob > 0 else ""
    suffix += f",K<={beam.max_tree_tokens}" if beam.max_tree_tokens > 0 else ""
    suffix += f",look={beam.lookup_tokens}" if beam.lookup_tokens > 0 else ""
    suffix += f"/{beam.lookup_ngram}" if beam.lookup_tokens > 0 and beam.lookup_ngram != BeamConfig.lookup_ngram else ""
    suffix += f",gate={beam.min_tokens_per_step:g}" if beam.min_tokens_per_step > 0 else ""
    applies = beam.extend_prob > 0 and beam.lookup_tokens > 0 and beam.max_tree_tokens > 0
    suffix += f",ext>={beam.extend_prob:g}" if applies else ""
    suffix += f",{draft_mode}" if draft_mode in SAMPLED_DRAFT_MODES else ""
    return f"redrafter[W={beam.width},L={beam.length}{suffix}]"


def build_methods(names: Sequence[str], ctx: BenchContext, *,
                  drafters: Sequence[tuple[str, object, Sequence[BeamConfig]]] = (),
                  draft_modes: Sequence[str] = ("beam",), assistant_model=None, prompt_lookup_tokens: int = 10,
                  drafter_weights: Sequence[str] = ("auto",)) -> tuple[list[Method], dict[str, str]]:
    """Instantiate the requested methods in the requested order. With several ``drafter_weights``
    (``inference_copy``) every redrafter setting runs with each, named with ``,drafter=<weights>``.
    ``drafters``: (label, drafter, beam settings) for each drafter that method "redrafter" runs, every
    setting with each; with a label (several drafters in one run) the methods are named ``...@<label>``.

    Returns:
        (methods, skipped) where ``skipped`` maps a method name to the reason it cannot run here.
    """
    from redrafter.errors import RedrafterError

    unknown = [n for n in names if n not in METHOD_NAMES]
    if unknown:
        raise RedrafterError(f"unknown method(s) {unknown}; choose from {list(METHOD_NAMES)}")
    target, stops = ctx.target, ctx.stop_token_ids
    pad = getattr(ctx.tokenizer, "pad_token_id", None)
    methods: list[Method] = []
    skipped: dict[str, str] = {}
    for name in names:
        if name == "hf-generate":
            methods.append(HFGenerateMethod(name, target.model, stops, pad, ctx.sampling))
        elif name == "ar":
            methods.append(EngineMethod(name, Engine(target), stops, ctx.sampling))
        elif name == "redrafter":
            if not drafters:
                raise RedrafterError("method 'redrafter' needs --drafter DIR")
            # Draft modes differ only when sampling; greedy always runs beam search.
            modes = ["beam"] if ctx.sampling.greedy else list(dict.fromkeys(draft_modes))
            weights = list(dict.fromkeys(drafter_weights))
            for source, model, settings in drafters:
                origin = f"@{source}" if source else ""
                for weight in weights:
                    snapshot = inference_copy(model, weights=weight)  # one copy shared by every beam setting
                    label = f",drafter={snapshot.weights}" if len(weights) > 1 else ""
                    for mode in modes:
                        for beam in settings:
                            proposer = ReDrafterProposer(snapshot, target, beam, draft_mode=mode)
                            name = redrafter_name(beam, mode)
                            methods.append(EngineMethod(name[:-1] + label + "]" + origin, Engine(target, proposer),
                                                        stops, ctx.sampling))
        elif name == "lookup":
            methods.append(EngineMethod(f"lookup[{prompt_lookup_tokens}]", Engine(target, LookupProposer(prompt_lookup_tokens)),
                                        stops, ctx.sampling))
        elif name == "hf-prompt-lookup":
            methods.append(HFGenerateMethod(name, target.model, stops, pad, ctx.sampling,
                                            prompt_lookup_num_tokens=prompt_lookup_tokens))
        elif name == "hf-assisted":
            if assistant_model is None:
                skipped[name] = "no --assistant-model given"
            else:
                methods.append(HFGenerateMethod(name, target.model, stops, pad, ctx.sampling,
                                                assistant_model=assistant_model))
        elif name == "llamacpp":
            if not ctx.sampling.greedy:
                skipped[name] = "runs greedy only"
            elif importlib.util.find_spec("llama_cpp") is None:
                skipped[name] = "llama-cpp-python is not installed"
            elif ctx.gguf_path is None:
                skipped[name] = "the model has no GGUF file"
            else:
                methods.append(LlamaCppMethod(name, ctx.gguf_path, stops, ctx.threads))
    return methods, skipped

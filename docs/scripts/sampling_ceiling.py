"""What speculative sampling can reach on this machine, with the shipped drafter and with a perfect one.

Run from the repository (after ``make install``), e.g.::

    redrafter profile --backends native --context 300 --tree-sizes 1,2,3,4,5,6,7,8,9,12,16 \\
        --repeats 11 --threads 2 --out runs/curve
    python docs/scripts/sampling_ceiling.py --verify-curve runs/curve/profile.json --out runs/ceiling

1. The target answers MT-Bench turn-1 questions by plain sampling at each temperature (the default
   backend, as ``redrafter bench --methods ar``).
2. On those answers, with the target in float32 (transformers), at every answer position and depth
   1 and 2 (depth 2 after the true depth-1 token), per tree node with n candidates:

   - ``drafter_one_draw``: sum_x min(p, q), one candidate drawn from the drafter's q;
   - ``drafter_iid_bound``: sum_x min(p(x), 1 - (1 - q(x))^n), the most any exact scheme can accept
     with n i.i.d. draws from q (SpecTr);
   - ``drafter_top_n``: p(the n most probable tokens under q), deterministic candidates verified by
     drawing from p (``--draft-mode beam``);
   - ``perfect_top_n``: p(the n most probable tokens under p). No exact scheme with n candidates at a
     node accepts more often: the emitted token is distributed as p and must be one of them.

3. A perfect drafter's chain, measured without assuming anything: from every 8th answer position, the
   target's own greedy continuation of 8 tokens; the chain is accepted to depth d with probability
   prod_{i<=d} p(token_i), so tau = 1 + sum_d prod_{i<=d} p(token_i).
4. The best tree of K drafted nodes for a perfect drafter (a dynamic programme over the per-node
   gains of ``perfect_top_n``, which treats nodes as independent), raised by the chain's measured
   exact/independent ratio at depth min(K, 8) for the sure stretches, and the speed it would give
   against plain decoding, tau * verify(1) / verify(K + 1), from the measured verify-cost curve with
   drafting taken as free. An estimate within a few percent, not a strict bound: a perfect drafter
   can also shape its tree per context (the exact per-position bound, the K paths most probable
   under p, came out 2.5-3 % higher on a small sample), while steps start only where the previous
   one stopped (which lowers it about as much).
"""
from __future__ import annotations

import argparse
import copy
import json
from functools import lru_cache
from pathlib import Path

import torch

from redrafter import DEFAULT_MODEL, Engine, FinishEvent, GenerationConfig, SamplingParams, load_drafter, load_target
from redrafter.bench.workloads import mt_bench
from redrafter.cli import encode_prompt, stop_token_ids
from redrafter.models.loading import shipped_drafter

CANDIDATES = (1, 2, 3, 4, 8, 16)
CHAIN_DEPTH = 8
TREE_NODES = (1, 2, 3, 4, 5, 6, 7, 8, 11, 15)


def sampled_answers(questions, temperature: float, seed: int, max_new_tokens: int) -> list[list[int]]:
    target, tokenizer = load_target()
    engine, stops = Engine(target), stop_token_ids(tokenizer, target)
    config = GenerationConfig(max_new_tokens=max_new_tokens, stop_token_ids=stops,
                              sampling=SamplingParams(temperature=temperature, seed=seed))
    answers = []
    for row, prompt in enumerate(questions, start=1):
        finish = next(e for e in engine.generate([prompt], config, row_offset=row) if isinstance(e, FinishEvent))
        answers.append(list(finish.token_ids))
    return answers


def node_acceptance(model, embed, drafter, prompts, answers, temperature: float) -> dict:
    sums: dict[str, list[torch.Tensor]] = {}
    d2t = drafter.draft_to_target
    for prompt, answer in zip(prompts, answers):
        seq = torch.tensor(prompt + answer)[None]
        hidden = model.model(seq).last_hidden_state[0]
        logits = model.lm_head(hidden).float()
        js = torch.arange(len(prompt), seq.shape[1] - 2)  # g0 = token j, emitted after the state before it
        before = hidden[js - 1]
        s1 = drafter.next_state(drafter.initial_state(before), embed(seq[0, js]))
        s2 = drafter.next_state(s1, embed(seq[0, js + 1]))
        for depth, state, at in ((1, s1, js), (2, s2, js + 1)):
            p_full = torch.softmax(logits[at] / temperature, -1)
            p = p_full[:, d2t]
            q = torch.softmax(drafter.logits(before, state) / temperature, -1)
            by_q = p.gather(-1, q.argsort(-1, descending=True)).cumsum(-1)
            by_p = p_full.sort(-1, descending=True).values.cumsum(-1)
            sums.setdefault(f"depth{depth}/drafter_one_draw", []).append(torch.minimum(p, q).sum(-1))
            for n in CANDIDATES:
                sums.setdefault(f"depth{depth}/drafter_iid_bound/{n}", []).append(
                    torch.minimum(p, 1 - (1 - q) ** n).sum(-1))
                sums.setdefault(f"depth{depth}/drafter_top_n/{n}", []).append(by_q[:, n - 1])
                sums.setdefault(f"depth{depth}/perfect_top_n/{n}", []).append(by_p[:, n - 1])
    out: dict = {}
    for key, values in sums.items():
        parts = key.split("/")
        slot = out.setdefault(parts[0], {})
        mean = round(torch.cat(values).mean().item(), 4)
        if len(parts) == 2:
            slot[parts[1]] = mean
        else:
            slot.setdefault(parts[1], {})[int(parts[2])] = mean
    return out


def perfect_chain(model, prompts, answers, temperature: float) -> dict:
    chains = []
    for prompt, answer in zip(prompts, answers):
        full = prompt + answer
        out = model(torch.tensor(full)[None], use_cache=True)
        for t in range(len(prompt), len(full) - 1, 8):  # the chain starts after full[:t]
            cache = copy.deepcopy(out.past_key_values)
            cache.crop(t - len(full))
            logits, probs = out.logits[0, t - 1].float(), []
            for _ in range(CHAIN_DEPTH):
                token = int(logits.argmax())
                probs.append(torch.softmax(logits / temperature, -1)[token].item())
                step = model(torch.tensor([[token]]), past_key_values=cache, use_cache=True)
                cache, logits = step.past_key_values, step.logits[0, -1].float()
            chains.append(probs)
    reach = torch.tensor(chains).cumprod(-1)
    first = reach[:, 0].mean().item()
    return {"starts": len(chains),
            "tau_exact": {d: round(1 + reach[:, :d].sum(-1).mean().item(), 4) for d in range(1, CHAIN_DEPTH + 1)},
            "tau_if_independent": {d: round(sum(first ** i for i in range(d + 1)), 4)
                                   for d in range(1, CHAIN_DEPTH + 1)}}


def perfect_trees(top_n: dict[int, float], chain: dict, verify_ms: dict[int, float]) -> dict:
    gains, before, last = [], 0, 0.0  # the i-th candidate's gain, spread evenly between measured n
    for n in sorted(top_n):
        gains += [(top_n[n] - last) / (n - before)] * (n - before)
        before, last = n, top_n[n]

    @lru_cache(None)
    def best(nodes: int, child: int = 0) -> float:
        """Expected accepted drafted tokens under a node whose children from ``child`` on share ``nodes``."""
        if nodes == 0 or child >= len(gains):
            return 0.0
        value = 0.0
        for k in range(1, nodes + 1):  # child ``child`` takes k nodes: itself and k - 1 below it
            value = max(value, gains[child] * (1 + best(k - 1)) + best(nodes - k, child + 1))
        return value

    sizes = sorted(verify_ms)
    out = {}
    for nodes in TREE_NODES:
        if nodes + 1 > sizes[-1]:
            break
        lo = max(s for s in sizes if s <= nodes + 1)
        hi = min(s for s in sizes if s >= nodes + 1)
        ms = verify_ms[lo]
        if hi != lo:  # between two measured sizes: linear
            ms += (verify_ms[hi] - verify_ms[lo]) * (nodes + 1 - lo) / (hi - lo)
        depth = min(nodes, CHAIN_DEPTH)
        correction = chain["tau_exact"][depth] / chain["tau_if_independent"][depth]
        tau = (1 + best(nodes)) * correction
        out[nodes] = {"tau": round(tau, 3), "verify_ms": round(ms, 3),
                      "x_plain": round(tau * verify_ms[1] / ms, 3)}
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, run in result["temperatures"].items():
        trees = run["perfect_trees"]
        ax.plot([k + 1 for k in map(int, trees)], [t["x_plain"] for t in trees.values()], marker="o",
                label=f"perfect drafter, T = {name}")
    ax.axhline(2.0, color="grey", linestyle="--", label="issue 6 target (2x)")
    ax.set_xlabel("tree tokens verified per step (g0 included)")
    ax.set_ylabel("x plain sampling (ceiling, free drafting)")
    ax.set_title("Speculative sampling's ceiling on this machine")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--verify-curve", required=True, help="redrafter profile's profile.json (native backend)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--drafter", default=None, help="drafter directory (default: the shipped one)")
    parser.add_argument("--temperatures", default="0.7,1.0")
    parser.add_argument("--every", type=int, default=4, help="every n-th MT-Bench question, from the second")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    profile = json.loads(Path(args.verify_curve).read_text())
    backend, curve = next(iter(profile["backends"].items()))
    verify_ms = {int(k): v for k, v in curve["verify_ms"].items()}

    model_fp32, tokenizer = load_target(backend="hf", dtype="float32")
    drafter = load_drafter(args.drafter or shipped_drafter(DEFAULT_MODEL)).float()
    questions = mt_bench()[1::args.every]
    prompts = [encode_prompt(tokenizer, q.turns[0], chat_template=True) for q in questions]
    result = {"what": __doc__, "questions": [q.id for q in questions],
              "verify_curve": {"backend": backend, **verify_ms}, "threads": args.threads, "temperatures": {}}
    with torch.inference_mode():
        for temperature in map(float, args.temperatures.split(",")):
            answers = sampled_answers(prompts, temperature, args.seed, args.max_new_tokens)
            nodes = node_acceptance(model_fp32.model, model_fp32.embed, drafter, prompts, answers, temperature)
            chain = perfect_chain(model_fp32.model, prompts, answers, temperature)
            trees = perfect_trees(nodes["depth1"]["perfect_top_n"], chain, verify_ms)
            result["temperatures"][str(temperature)] = {"answer_tokens": sum(map(len, answers)), "per_node": nodes,
                                                        "perfect_chain": chain, "perfect_trees": trees}
            best = max(trees.values(), key=lambda t: t["x_plain"])
            print(f"T = {temperature}: one draw from q accepted {nodes['depth1']['drafter_one_draw']:.3f} at depth 1 "
                  f"(a perfect drafter's best token {nodes['depth1']['perfect_top_n'][1]:.3f}); a perfect drafter "
                  f"reaches about {best['x_plain']:.2f}x plain sampling (tau {best['tau']:.2f})", flush=True)
    (out / "sampling_ceiling.json").write_text(json.dumps(result, indent=1))
    plot(result, out / "sampling_ceiling.png")
    print(f"wrote {out / 'sampling_ceiling.json'}, {out / 'sampling_ceiling.png'}")


if __name__ == "__main__":
    main()

"""Drafter training on a tiny random target: the loss learns, resume continues exactly, and the
trained (reduced-vocabulary) drafter drives lossless generation."""

import dataclasses
import json

import pytest
import torch

from helpers import TINY_VOCAB, hf_greedy, tiny_target
from redrafter import BeamConfig, Engine, FinishEvent, GenerationConfig, ReDrafterProposer, RedrafterError, load_drafter
from redrafter.training.loss import accepted_run_stats, multi_step_loss
from redrafter.drafter.model import recommended_beam, save_drafter
from redrafter.training.train import TrainConfig, train


@pytest.fixture(scope="module")
def target():
    return tiny_target("llama", seed=3, init=0.1)  # a milder init: answers a small drafter can learn


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, target):
    """Datagen-format shards: the tiny target's own greedy answers to random prompts."""
    directory = tmp_path_factory.mktemp("data")
    generator = torch.Generator().manual_seed(0)
    records = []
    for i in range(48):
        prompt = torch.randint(0, TINY_VOCAB, (int(torch.randint(3, 12, (1,), generator=generator)),),
                               generator=generator).tolist()
        records.append({"id": f"r{i}", "prompt": "", "prompt_ids": prompt,
                        "response_ids": hf_greedy(target.model, prompt, 24), "finish_reason": "length"})
    for shard in range(2):
        (directory / f"shard-{shard:05d}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in records[shard * 24:(shard + 1) * 24]))
    return directory


def test_loss_alignment_golden():
    """Step i at position t reads tokens[t+i] and is scored against next_tokens[t+i] where
    label_mask[t+i+1]; checked with a drafter whose logits are a one-hot of its input token."""

    class Echo(torch.nn.Module):  # predicts its last input token + 1, so accuracy reveals the alignment
        def next_state(self, state, emb):
            return emb

        def logits(self, h, s):
            return torch.nn.functional.one_hot(s[..., 0].long() + 1, 10).float() * 10

    tokens = torch.tensor([[1, 2, 3, 4, 5, 6]])
    mask = torch.tensor([[False, False, True, True, True, True]])
    embed = lambda t: t.unsqueeze(-1).float().expand(*t.shape, 4)  # noqa: E731
    out = multi_step_loss(Echo(), embed, torch.zeros(1, 6, 4), tokens, tokens.roll(-1, dims=1), mask, steps=2)
    # step 1 at t: input tokens[t+1], label tokens[t+2] = input + 1 -> always right where valid
    assert out.valid[0, 0].tolist() == [True, True, True, True, False, False]
    assert out.correct[0, 0].tolist() == [True, True, True, True, False, False]
    assert out.valid[1, 0].tolist() == [True, True, True, False, False, False]
    stats = accepted_run_stats(out.correct, out.valid)
    assert stats["accuracy"] == [1.0, 1.0] and stats["tau_w1"] == 3.0


@pytest.mark.parametrize("top_k", [0, 3])
def test_kl_term_matches_a_position_by_position_reference(top_k):
    """The mixed loss (1 - α) CE(label) + α CE(p_target, q) per step equals a plain loop that runs the
    drafter position by position and takes the target's distribution after position t + i (a batch
    of two, a reduced draft vocabulary with labels outside it, and a context mask)."""
    from redrafter import Drafter, DrafterConfig
    from redrafter.training.loss import Teacher

    torch.manual_seed(0)
    hidden_size, vocab, draft_vocab, length, steps, alpha = 8, 9, 6, 9, 3, 0.3
    draft_to_target = torch.tensor([0, 2, 3, 5, 7, 8])
    target_to_draft = torch.full((vocab,), -1, dtype=torch.long)
    target_to_draft[draft_to_target] = torch.arange(draft_vocab)
    drafter = Drafter(DrafterConfig(hidden_size=hidden_size, vocab_size=draft_vocab, exit_dim=12)).double()
    table = torch.randn(vocab, hidden_size, dtype=torch.double)
    embed = lambda t: table[t]  # noqa: E731
    head = torch.randn(vocab, hidden_size, dtype=torch.double)  # the target's full LM head
    hidden = torch.randn(2, length, hidden_size, dtype=torch.double)
    tokens = torch.randint(0, vocab, (2, length))
    next_tokens = torch.randint(0, vocab, (2, length))
    mask = torch.tensor([[False, False] + [True] * (length - 2), [False] * 4 + [True] * (length - 6) + [False] * 2])
    context = torch.ones(2, length, dtype=torch.bool)
    context[1, :3] = False
    teacher = Teacher(head[draft_to_target], None, top_k=top_k, weight=alpha)
    out = multi_step_loss(drafter, embed, hidden, tokens, next_tokens, mask, steps=steps,
                          target_to_draft=target_to_draft, context_mask=context, teacher=teacher)

    for i in range(1, steps + 1):
        expected, count = torch.zeros((), dtype=torch.double), 0
        for b in range(2):
            for t in range(length - i - 1):
                label = int(target_to_draft[next_tokens[b, t + i]])
                if not (mask[b, t + i + 1] and context[b, t]) or label < 0:
                    continue
                state = torch.zeros(hidden_size, dtype=torch.double)
                for j in range(1, i + 1):
                    state = drafter.next_state(state, embed(tokens[b, t + j]))
                log_q = torch.log_softmax(drafter.logits(hidden[b, t], state), dim=-1)
                target_logits = head[draft_to_target] @ hidden[b, t + i]
                p = torch.softmax(target_logits, dim=-1)
                if top_k:
                    keep = p.topk(top_k).indices
                    p = torch.zeros_like(p).index_copy_(0, keep, torch.softmax(target_logits[keep], dim=-1))
                expected = expected + (1 - alpha) * -log_q[label] - alpha * (p * log_q).sum()
                count += 1
        assert int(out.counts[i - 1]) == count > 0
        torch.testing.assert_close(out.sums[i - 1].double(), expected, rtol=1e-5, atol=1e-6)


CONFIG = TrainConfig(draft_vocab_size=48, exit_dim=64, predict_tokens=3, epochs=10, lr=1e-2, batch_tokens=256,
                     eval_fraction=0.2, eval_every=10, save_every=10)


@pytest.mark.parametrize("kl", [None, (1.0, 8)], ids=["labels", "kl-only"])
def test_train_learns(target, data_dir, tmp_path, kl):
    # kl-only (α = 1): the labels are ignored, so the drafter learns the target's tokens only through
    # the LM head rows train() picks for the draft vocabulary; wrong rows would leave it at chance.
    config = CONFIG if kl is None else dataclasses.replace(CONFIG, kl_weight=kl[0], kl_top_k=kl[1])
    summary = train(model_spec="tiny", data=str(data_dir), out=str(tmp_path), config=config, target=target,
                    progress=False)
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in metrics if "eval_loss" in m]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 0.1
    assert summary["accuracy"][0] > 0.1  # chance is ~1/48
    assert summary["tau_w1"] > 1.1
    assert (tmp_path / "loss.png").is_file() and (tmp_path / "drafter" / "model.safetensors").is_file()


def test_bf16_mixed_precision_runs_the_products_in_bf16_and_learns(target, data_dir, tmp_path, monkeypatch):
    """--mixed-precision bf16: the drafter's logits come out of bf16 products (autocast), the
    checkpoint stays float32, and the drafter learns as in float32."""
    from redrafter.drafter.model import Drafter

    seen, logits = set(), Drafter.logits

    def recording(self, context, state):
        out = logits(self, context, state)
        seen.add(out.dtype)
        return out

    monkeypatch.setattr(Drafter, "logits", recording)
    summary = train(model_spec="tiny", data=str(data_dir), out=str(tmp_path), progress=False, target=target,
                    config=dataclasses.replace(CONFIG, mixed_precision="bf16"))
    assert seen == {torch.bfloat16}
    assert summary["accuracy"][0] > 0.1 and summary["tau_w1"] > 1.1
    from safetensors.torch import load_file

    assert {v.dtype for k, v in load_file(tmp_path / "drafter" / "model.safetensors").items()
            if k != "draft_to_target"} == {torch.float32}
    with pytest.raises(RedrafterError, match="mixed-precision"):
        TrainConfig(mixed_precision="fp8")


def test_interrupted_training_resumes_to_the_same_weights(target, data_dir, tmp_path):
    train(model_spec="tiny", data=str(data_dir), out=str(tmp_path / "a"), config=CONFIG, target=target,
          progress=False)
    import redrafter.training.train as module

    original, calls = module.multi_step_loss, {"n": 0}

    def interrupted(*args, **kwargs):  # dies in the 11th training step, after the step-10 checkpoint
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] > 10:
                raise KeyboardInterrupt
        return original(*args, **kwargs)

    module.multi_step_loss = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            train(model_spec="tiny", data=str(data_dir), out=str(tmp_path / "b"), config=CONFIG, target=target,
                  progress=False)
    finally:
        module.multi_step_loss = original
    assert not (tmp_path / "b" / "drafter").exists()
    train(model_spec="tiny", data=str(data_dir), out=str(tmp_path / "b"), config=CONFIG, target=target, resume=True,
          progress=False)
    a, b = load_drafter(tmp_path / "a" / "drafter"), load_drafter(tmp_path / "b" / "drafter")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4, msg=name)


def test_trained_reduced_vocab_drafter_is_lossless_and_accepts(target, data_dir, tmp_path):
    config = TrainConfig(draft_vocab_size=40, exit_dim=64, predict_tokens=4, epochs=10, lr=1e-2, batch_tokens=256,
                         eval_fraction=0.2, eval_every=1000, save_every=1000)
    train(model_spec="tiny", data=str(data_dir), out=str(tmp_path / "t"), config=config, target=target,
          progress=False)
    drafter = load_drafter(tmp_path / "t" / "drafter")
    assert drafter.config.vocab_size == 40 and drafter.config.target_vocab_size == TINY_VOCAB
    assert drafter.draft_to_target.dtype == torch.long and len(set(drafter.draft_to_target.tolist())) == 40
    engine = Engine(target, ReDrafterProposer(drafter, target, BeamConfig(width=3, length=5)))
    tokens = steps = 0
    for prompt in ([5, 9, 1], [44, 2, 17, 80], [7]):
        reference = hf_greedy(target.model, prompt, 32)
        result = next(e for e in engine.generate([prompt], GenerationConfig(max_new_tokens=32))
                      if isinstance(e, FinishEvent))
        assert list(result.token_ids) == reference
        tokens, steps = tokens + result.stats.num_new_tokens - 1, steps + result.stats.num_steps
    assert tokens / steps > 1.15  # the trained drafter is accepted, unlike a random one (~1.0)


def test_two_process_data_parallel_training_equals_one_process(target, data_dir, tmp_path):
    """``torchrun --nproc-per-node 2 -m redrafter train`` (gloo on CPU) ends with the same weights as one
    process on the same global batches."""
    import os
    import subprocess
    import sys

    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    model_dir = tmp_path / "tiny-model"
    target.model.save_pretrained(model_dir)
    vocab = {f"t{i}": i for i in range(TINY_VOCAB)}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0"))).save_pretrained(model_dir)
    common = ["train", "--model", str(model_dir), "--data", str(data_dir), "--draft-vocab-size", "48",
              "--epochs", "1", "--batch-tokens", "256", "--predict-tokens", "3", "--eval-every", "1000",
              "--threads", "1", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "redrafter", *common, "--out", str(tmp_path / "one")],
                            capture_output=True, text=True, env=env, timeout=600)
    assert single.returncode == 0, single.stderr[-2000:]
    double = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "redrafter", *common, "--out", str(tmp_path / "two")],
                            capture_output=True, text=True, env=env, timeout=600)
    assert double.returncode == 0, double.stderr[-2000:]
    one = json.loads(single.stdout.splitlines()[-1])
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == one["steps"] >= 5
    a, b = load_drafter(tmp_path / "one" / "drafter"), load_drafter(tmp_path / "two" / "drafter")
    assert torch.equal(a.draft_to_target, b.draft_to_target)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, atol=2e-5, rtol=1e-4, msg=name)
    assert summary["eval_loss"] == pytest.approx(one["eval_loss"], abs=1e-4)


def test_stored_datagen_states_equal_a_target_pass(target, data_dir):
    """Examples built from the engine's returned hidden states (what datagen stores) carry the same
    states and labels, at every position training uses, as one full target pass over the record."""
    from redrafter.engine import TokensEvent
    from redrafter.training.datagen import read_records
    from redrafter.training.train import compute_targets, make_examples

    records = read_records(data_dir)[:6]
    stored = []
    for r in records:
        events = list(Engine(target).generate([r["prompt_ids"]], GenerationConfig(max_new_tokens=24), return_hidden=True))
        tokens = [t for e in events if isinstance(e, TokensEvent) for t in e.token_ids]
        assert tokens == r["response_ids"]
        states = torch.cat([e.hidden for e in events if isinstance(e, TokensEvent)]).to(torch.bfloat16)
        stored.append({**r, "states": states})
    from_states, from_target = make_examples(stored, 1024), make_examples(records, 1024)
    compute_targets(target, from_target, batch_tokens=512, progress=False)
    for a, b, r in zip(from_states, from_target, records):
        used = slice(len(r["prompt_ids"]) - 1, len(a.tokens) - 1)  # contexts from the last prompt token on
        assert a.context_from == b.context_from == len(r["prompt_ids"]) - 1
        assert torch.equal(a.next_tokens[used], b.next_tokens[used])
        torch.testing.assert_close(a.hidden[used].float(), b.hidden[used].float(), atol=2e-2, rtol=2e-2)


def test_stored_dataset_answer_labels_are_the_targets_own_tokens(target, data_dir):
    """Dataset answers (not written by the target): datagen's stored states and next-token labels
    give the same examples as a target pass, and the labels are the target's argmax, not the data."""
    from redrafter.training.datagen import read_records, teacher_forced_states
    from redrafter.training.train import compute_targets, make_examples

    gen = torch.Generator().manual_seed(5)
    records = [{**r, "response_ids": torch.randint(0, 64, (len(r["response_ids"]) + 3,), generator=gen).tolist()}
               for r in read_records(data_dir)[:5]]
    stored = [{**r, "states": states, "next_ids": next_ids}
              for r, (states, next_ids) in zip(records, teacher_forced_states(target, records, batch_tokens=256))]
    from_states, from_target = make_examples(stored, 1024), make_examples(records, 1024)
    compute_targets(target, from_target, batch_tokens=512, progress=False)
    differs = 0
    for a, b, r in zip(from_states, from_target, records):
        used = slice(len(r["prompt_ids"]) - 1, len(a.tokens) - 1)
        assert torch.equal(a.next_tokens[used], b.next_tokens[used])
        torch.testing.assert_close(a.hidden[used].float(), b.hidden[used].float(), atol=2e-2, rtol=2e-2)
        differs += int((a.next_tokens[used] != a.tokens[1:][used]).sum())
    assert differs > 0  # random answers: the target disagrees with the data somewhere
    from collections import Counter

    from redrafter.training.train import draft_vocabulary

    labels = Counter(t for e in from_states for t in e.next_tokens[:-1][e.label_mask[1:]].tolist())
    draft_to_target, _ = draft_vocabulary(from_states, 4, TINY_VOCAB)  # the vocabulary counts the labels
    assert set(draft_to_target.tolist()) == {t for t, _ in labels.most_common(4)}


def test_more_data_directories_add_training_records_but_never_a_held_out_prompt(target, data_dir, tmp_path):
    from redrafter.training.datagen import read_records

    total = len(read_records(data_dir))
    held = int(total * CONFIG.eval_fraction)
    config = dataclasses.replace(CONFIG, epochs=0.2)
    summary = train(model_spec="tiny", data=[str(data_dir), str(data_dir)], out=str(tmp_path), config=config,
                    target=target, progress=False)
    assert summary["eval_records"] == held  # from the first directory only
    assert summary["train_records"] == 2 * (total - held)  # the second copy of each held-out prompt is left out


def test_warm_start_carries_weights_by_token_id():
    from redrafter import Drafter, DrafterConfig
    from redrafter.errors import RedrafterError
    from redrafter.training.train import warm_start

    config = DrafterConfig(hidden_size=16, vocab_size=6, exit_dim=24, target_vocab_size=20)
    source, drafter = Drafter(config), Drafter(config)
    source.draft_to_target.copy_(torch.tensor([1, 3, 5, 7, 9, 11]))
    drafter.draft_to_target.copy_(torch.tensor([0, 3, 4, 9, 11, 12]))  # 3, 9 and 11 are shared
    assert warm_start(drafter, source) == 3
    h, state = torch.randn(4, 16), torch.randn(4, 16)
    torch.testing.assert_close(drafter.logits(h, state)[:, [1, 3, 4]], source.logits(h, state)[:, [1, 4, 5]])
    carried_mean = source.lm_head[2].weight[[1, 4, 5]].mean(dim=0)  # new tokens start as an average one
    for row in (0, 2, 5):
        torch.testing.assert_close(drafter.lm_head[2].weight[row], carried_mean)
    for name in ("rnn_u.weight", "rnn_w.weight", "input_proj.bias", "lm_head.1.linear.weight"):
        assert torch.equal(drafter.state_dict()[name], source.state_dict()[name])
    with pytest.raises(RedrafterError, match="exit_dim 24 and 2 layers, this run 32 and 2"):
        warm_start(Drafter(DrafterConfig(hidden_size=16, vocab_size=6, exit_dim=32, target_vocab_size=20)), source)
    with pytest.raises(RedrafterError, match="2 layers, this run 24 and 1"):
        warm_start(Drafter(DrafterConfig(hidden_size=16, vocab_size=6, exit_dim=24, num_draft_layers=1,
                                         target_vocab_size=20)), source)


def test_warm_start_into_more_layers_keeps_the_source_function_and_trains_the_new_blocks():
    from redrafter import Drafter, DrafterConfig
    from redrafter.training.train import warm_start

    torch.manual_seed(0)
    source = Drafter(DrafterConfig(hidden_size=16, vocab_size=6, exit_dim=24, target_vocab_size=20))
    deeper = Drafter(DrafterConfig(hidden_size=16, vocab_size=6, exit_dim=24, num_draft_layers=4, target_vocab_size=20))
    source.draft_to_target.copy_(torch.tensor([1, 3, 5, 7, 9, 11]))
    deeper.draft_to_target.copy_(source.draft_to_target)
    assert warm_start(deeper, source) == 6
    h, state = torch.randn(4, 16), torch.randn(4, 16)
    torch.testing.assert_close(deeper.logits(h, state), source.logits(h, state))  # exactly the source's q
    torch.testing.assert_close(deeper.lm_head[4].weight, source.lm_head[2].weight)
    for i in (0, 1):
        assert torch.equal(deeper.lm_head[i].linear.weight, source.lm_head[i].linear.weight)
    deeper.logits(h, state).logsumexp(-1).sum().backward()
    for i in (2, 3):  # the added blocks start at zero but are not stuck there
        assert torch.equal(deeper.lm_head[i].linear.weight, torch.zeros(24, 24))
        assert deeper.lm_head[i].linear.weight.grad.abs().sum() > 0


def test_training_from_init_starts_where_the_init_drafter_ended(target, data_dir, tmp_path):
    first = train(model_spec="tiny", data=str(data_dir), out=str(tmp_path / "a"), config=CONFIG, target=target,
                  progress=False)
    config = dataclasses.replace(CONFIG, epochs=1, lr=1e-4, eval_every=1)
    second = train(model_spec="tiny", data=str(data_dir), out=str(tmp_path / "b"), config=config, target=target,
                   progress=False, init=str(tmp_path / "a" / "drafter"))
    metrics = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    random_start = next(m for m in metrics if "eval_loss" in m)["eval_loss"]
    assert second["init_vocabulary_rows"] == CONFIG.draft_vocab_size  # the same data: the same vocabulary
    assert abs(second["eval_loss"] - first["eval_loss"]) < 0.05 < random_start - first["eval_loss"]
    assert abs(second["init_eval"]["eval_loss"] - first["eval_loss"]) < 1e-4  # step 0: the init drafter itself


def test_draft_vocabulary_fills_spare_slots_from_the_warm_start_before_unused_ids():
    from redrafter.training.train import Example, draft_vocabulary

    tokens = torch.tensor([5, 7, 7, 9, 9, 9])
    example = Example(tokens, torch.tensor([False, True, True, True, True, True]))
    plain, _ = draft_vocabulary([example], 6, 20)
    assert plain.tolist() == [0, 1, 2, 3, 7, 9]  # the two labels (7, 9), then the lowest unused ids
    filled, target_to_draft = draft_vocabulary([example], 6, 20, fill=torch.tensor([3, 9, 11, 15, 17]))
    assert filled.tolist() == [3, 7, 9, 11, 15, 17]  # the labels, then the warm start's other tokens
    assert target_to_draft[filled].tolist() == list(range(6)) and int((target_to_draft >= 0).sum()) == 6
    fewer, _ = draft_vocabulary([example], 4, 20, fill=torch.tensor([17, 9, 15, 11, 3]))
    assert fewer.tolist() == [7, 9, 15, 17]  # the warm start's tokens in its order, while slots last


def test_keep_vocabulary_keeps_the_init_drafters_tokens(target, data_dir, tmp_path):
    first = dataclasses.replace(CONFIG, epochs=0.2)
    train(model_spec="tiny", data=str(data_dir), out=str(tmp_path / "a"), config=first, target=target, progress=False)
    init = load_drafter(tmp_path / "a" / "drafter")
    # Another vocabulary than the data's most frequent tokens: the 48 ids the first run left out first.
    left_out = [t for t in range(TINY_VOCAB) if t not in set(init.draft_to_target.tolist())]
    other = sorted((left_out + init.draft_to_target.tolist())[: CONFIG.draft_vocab_size])
    init.draft_to_target.copy_(torch.tensor(other))
    save_drafter(init, tmp_path / "init")
    (tmp_path / "init" / "generation.json").write_text(json.dumps({"beam_width": 3, "beam_length": 2,
                                                                 "int4": {"beam_width": 5, "beam_length": 3}}))
    config = dataclasses.replace(CONFIG, epochs=0.2, keep_vocabulary=True)
    summary = train(model_spec="tiny", data=str(data_dir), out=str(tmp_path / "b"), config=config, target=target,
                    progress=False, init=str(tmp_path / "init"))
    assert load_drafter(tmp_path / "b" / "drafter").draft_to_target.tolist() == other
    for weights in ("dense", "int4"):  # the init drafter's measured beam settings come along
        assert recommended_beam(tmp_path / "b" / "drafter", weights) == recommended_beam(tmp_path / "init", weights)
    assert recommended_beam(tmp_path / "b" / "drafter", "int4").width == 5
    inherited = json.loads((tmp_path / "b" / "drafter" / "generation.json").read_text())["inherited_from"]
    assert inherited == str(tmp_path / "init")
    with pytest.raises(RedrafterError, match=r"other settings .*'keep_vocabulary': \(True, False\)"):  # without the flag
        train(model_spec="tiny", data=str(data_dir), out=str(tmp_path / "b"), config=first, target=target,
              progress=False, init=str(tmp_path / "init"), resume=True)
    with pytest.raises(RedrafterError, match="pass --draft-vocab-size 48"):
        train(model_spec="tiny", data=str(data_dir), out=str(tmp_path / "e"), target=target, progress=False,
              config=dataclasses.replace(config, draft_vocab_size=40), init=str(tmp_path / "init"))
    assert summary["init_vocabulary_rows"] == CONFIG.draft_vocab_size
    rerank = train(model_spec="tiny", data=str(data_dir), out=str(tmp_path / "c"), config=first, target=target,
                   progress=False, init=str(tmp_path / "init"))
    assert rerank["init_vocabulary_rows"] < CONFIG.draft_vocab_size  # without it the data picks the tokens
    with pytest.raises(RedrafterError, match="--keep-vocabulary needs --init"):
        train(model_spec="tiny", data=str(data_dir), out=str(tmp_path / "d"), config=config, target=target,
              progress=False)


def test_a_run_continues_only_its_own_checkpoint(target, data_dir, tmp_path):
    """A finished or interrupted run's checkpoint is never silently restarted over: without --resume
    the run is refused; with --resume, other settings or other data are refused, naming what
    differs."""
    train(model_spec="tiny", data=str(data_dir), out=str(tmp_path), config=CONFIG, target=target, progress=False)
    with pytest.raises(RedrafterError, match="holds the checkpoint of an earlier run: pass --resume"):
        train(model_spec="tiny", data=str(data_dir), out=str(tmp_path), config=CONFIG, target=target, progress=False)
    with pytest.raises(RedrafterError, match=r"other settings .*'lr': \(0.01, 0.001\)"):
        train(model_spec="tiny", data=str(data_dir), out=str(tmp_path), config=dataclasses.replace(CONFIG, lr=1e-3),
              target=target, resume=True, progress=False)
    train(model_spec="tiny", data=str(data_dir), out=str(tmp_path), target=target, resume=True, progress=False,
          config=dataclasses.replace(CONFIG, eval_every=5, save_every=5))  # how often to evaluate and save may change
    more = tmp_path / "more"
    more.mkdir()
    (more / "shard-00000.jsonl").write_text((data_dir / "shard-00000.jsonl").read_text().replace('"id": "r', '"id": "s'))
    with pytest.raises(RedrafterError, match="other data"):
        train(model_spec="tiny", data=[str(data_dir), str(more)], out=str(tmp_path), config=CONFIG, target=target,
              resume=True, progress=False)
    summary = train(model_spec="tiny", data=str(data_dir), out=str(tmp_path), config=CONFIG, target=target,
                    resume=True, progress=False)  # the same run: nothing left to train
    assert summary["steps"] == json.loads((tmp_path / "summary.json").read_text())["steps"]


def test_a_checkpoint_save_killed_midway_is_tidied(tmp_path):
    """A kill inside ``atomic_directory`` leaves either a hidden temporary directory (removed on the
    next run) or, in the instant between its two renames, the previous checkpoint set aside as
    ``.checkpoint.old`` (put back)."""
    from redrafter.training.train import recover_checkpoint

    checkpoint = tmp_path / "checkpoint"
    old = tmp_path / ".checkpoint.old"
    old.mkdir()
    (old / "trainer.pt").write_text("complete")
    (tmp_path / ".checkpoint.x1y2").mkdir()
    recover_checkpoint(checkpoint)
    assert (checkpoint / "trainer.pt").read_text() == "complete"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


def test_bad_training_settings_are_named(target, data_dir, tmp_path):
    for kwargs, message in (({"eval_every": 0}, "--eval-every and --save-every must be >= 1"),
                            ({"save_every": 0}, "--eval-every and --save-every must be >= 1"),
                            ({"max_length": 1}, "--max-length must be >= 2")):
        with pytest.raises(RedrafterError, match=message):
            dataclasses.replace(CONFIG, **kwargs)
    with pytest.raises(RedrafterError, match="none of the .* records fits --max-length 4"):
        train(model_spec="tiny", data=str(data_dir), out=str(tmp_path / "o"), target=target, progress=False,
              config=dataclasses.replace(CONFIG, max_length=4))
    assert not (tmp_path / "o" / "checkpoint").exists()

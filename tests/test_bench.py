"""redrafter bench: the method interface, interleaving, metric arithmetic, output files, a smoke run."""

import json
import os

import pytest
import torch

from helpers import TINY_VOCAB, tiny_target
from redrafter import BeamConfig, Drafter, DrafterConfig, save_drafter
from redrafter.bench.methods import BenchContext, RunResult, build_methods
from redrafter.bench.report import grid_cells, markdown_table, plot_grid, write_outputs
from redrafter.bench.runner import Item, first_divergence, run_bench, schedule, summarise, summarise_rows
from redrafter.bench.workloads import BenchPrompt, load_workload
from redrafter.cli import main
from redrafter.config import SamplingParams

PROMPTS = [BenchPrompt(id=f"p{i}", category=c, turns=(t, "and then?")) for i, (c, t) in
           enumerate([("a", "abcde"), ("b", "hello world"), ("a", "xyz")])]


def encode(messages):
    return [ord(ch) % TINY_VOCAB for m in messages for ch in m["content"]][:40]


def decode(ids):
    return "".join(chr(97 + i % 26) for i in ids)


class FakeMethod:
    def __init__(self, name, log, tokens):
        self.name, self.log, self.tokens = name, log, tokens

    def run(self, prompt_ids, max_new_tokens):
        self.log.append((self.name, tuple(prompt_ids), max_new_tokens))
        return RunResult(self.tokens[:max_new_tokens], num_steps=2, elapsed_s=0.5, first_token_s=0.1)


def test_interleaved_schedule_and_warmup():
    log = []
    methods = [FakeMethod(n, log, [1, 2, 3, 4, 5]) for n in ("A", "B", "C")]
    items = [Item(p, 1) for p in PROMPTS]
    assert [(i.prompt.id, m.name) for i, m in schedule(items, methods)] == [
        (p, m) for p in ("p0", "p1", "p2") for m in ("A", "B", "C")]
    rows = run_bench(items, methods, encode=encode, decode=decode, max_new_tokens=5, warmup_tokens=3, progress=False)
    assert [(n, k) for n, _, k in log[:3]] == [("A", 3), ("B", 3), ("C", 3)]  # warm-up, excluded
    assert [n for n, _, _ in log[3:]] == ["A", "B", "C"] * 3
    assert len(rows) == 9 and all(r["num_new_tokens"] == 5 for r in rows)


def test_turn_two_uses_the_reference_answer():
    log = []
    methods = [FakeMethod("ar", log, [7, 8]), FakeMethod("B", log, [9])]
    items = [Item(PROMPTS[0], 2), Item(PROMPTS[0], 1)]
    run_bench(items, methods, encode=encode, decode=decode, max_new_tokens=4, warmup_tokens=0, progress=False)
    turn2 = [ids for name, ids, _ in log if name == "B"][1]
    assert turn2 == tuple(encode([{"content": "abcde"}, {"content": decode([7, 8])}, {"content": "and then?"}]))


def test_metric_arithmetic():
    def row(method, prompt, new, steps, elapsed, ids):
        return {"method": method, "prompt_id": prompt, "turn": 1, "category": "c", "num_new_tokens": new,
                "num_steps": steps, "elapsed_s": elapsed, "tokens_per_s": new / elapsed, "first_token_s": 0.1,
                "token_ids": ids, "identical_to_ar": None, "first_divergence": None}

    rows = [row("hf-generate", "p", 11, 10, 2.0, [1] * 11), row("ar", "p", 11, 10, 1.0, [1] * 11),
            row("redrafter", "p", 11, 4, 0.5, [1] * 11),
            row("hf-generate", "q", 21, 20, 4.0, [2] * 21), row("ar", "q", 21, 20, 2.0, [2] * 21),
            row("redrafter", "q", 21, 5, 0.5, [2] * 10 + [3] * 11)]
    from redrafter.bench.runner import mark_identical

    mark_identical(rows)
    s = summarise_rows(rows)
    assert s["ar"]["tau"] == 1.0
    assert s["redrafter"]["tau"] == pytest.approx((10 + 20) / (4 + 5))
    assert s["ar"]["speedup_vs_hf_generate"] == pytest.approx(2.0)
    assert s["redrafter"]["speedup_vs_ar"] == pytest.approx((11 / 0.5 / 11 + 21 / 0.5 / 10.5) / 2)
    # paired statistics of the per-prompt ratios 2 and 4: mean 3, standard error |4 - 2| / 2, both faster
    assert s["redrafter"]["speedup_vs_ar_mean"] == pytest.approx(3.0)
    assert s["redrafter"]["speedup_vs_ar_stderr"] == pytest.approx(1.0)
    assert s["redrafter"]["speedup_vs_ar_faster"] == "2/2"
    assert s["ar"]["speedup_vs_hf_generate_faster"] == "2/2" and s["hf-generate"]["speedup_vs_ar_faster"] == "0/2"
    assert s["ar"]["speedup_vs_ar"] == 1.0 and s["ar"]["speedup_vs_ar_faster"] is None  # not against itself
    only = summarise_rows([row("redrafter", "p", 11, 4, 0.5, [1] * 11)])["redrafter"]
    assert only["speedup_vs_ar_mean"] is None and only["speedup_vs_ar_faster"] is None  # no baseline ran
    assert s["redrafter"]["identical_to_ar"] == "1/2" and s["redrafter"]["first_divergences"] == [10]
    assert s["ar"]["tokens_per_s"] == pytest.approx((11 + 10.5) / 2)
    assert first_divergence([1, 2], [1, 2, 3]) == 2 and first_divergence([1], [1]) is None
    mark_identical(rows, compare=False)  # sampled answers are not compared: "= ar" is left out
    assert all(r["identical_to_ar"] is None for r in rows)
    assert "= ar" not in markdown_table(summarise_rows(rows))


@pytest.fixture(scope="module")
def tiny_methods():
    target = tiny_target("llama")
    torch.manual_seed(0)
    drafter = Drafter(DrafterConfig(hidden_size=64, vocab_size=TINY_VOCAB)).eval()
    ctx = BenchContext(target=target, tokenizer=None, stop_token_ids=(), threads=1)
    methods, skipped = build_methods(["hf-generate", "ar", "redrafter", "hf-prompt-lookup", "hf-assisted", "llamacpp"],
                                     ctx, drafters=[("", drafter, [BeamConfig(2, 3), BeamConfig(3, 4)])],
                                     assistant_model=tiny_target("llama", seed=5).model)
    return methods, skipped


def test_real_methods_on_a_tiny_model_agree_and_write_outputs(tiny_methods, tmp_path):
    methods, skipped = tiny_methods
    assert [m.name for m in methods] == ["hf-generate", "ar", "redrafter[W=2,L=3]", "redrafter[W=3,L=4]",
                                         "hf-prompt-lookup", "hf-assisted"]
    assert set(skipped) == {"llamacpp"}  # not installed in CI, or no GGUF for a tiny model: skipped, not failed
    items = [Item(p, 1) for p in PROMPTS]
    rows = run_bench(items, methods, encode=encode, decode=decode, max_new_tokens=12, warmup_tokens=2, progress=False)
    for r in rows:
        assert r["identical_to_ar"] is True, r  # greedy: every method reproduces plain decoding
        assert r["num_new_tokens"] == 12
        if r["method"] in ("hf-generate", "ar"):
            assert r["num_steps"] == 11 and r["tau"] == 1.0
        if r["method"] == "ar":
            assert r["num_tree_tokens"] == 11  # g0 alone per step
        elif r["method"].startswith("redrafter"):
            assert r["num_steps"] < r["num_tree_tokens"] <= r["num_steps"] * 10  # W=3 L=4: at most 1 + 3 x 3
    summary = summarise(rows)
    assert summary["methods"]["ar"]["tree_tokens_per_step"] == 1.0
    assert summary["methods"]["hf-generate"]["tree_tokens_per_step"] is None  # not our engine: not reported
    assert set(summary["categories"]) == {"a", "b"}
    written = write_outputs(tmp_path, rows, summary, {"dataset": "tiny", "machine": {}, "skipped": skipped})
    names = {p.name for p in written}
    assert {"results.jsonl", "summary.json", "summary.md", "speedup_per_category.png", "tau_grid.png"} <= names
    document = json.loads((tmp_path / "summary.json").read_text())
    for entry in document["methods"].values():
        assert {"tokens_per_s", "tau", "speedup_vs_hf_generate", "speedup_vs_ar", "identical_to_ar"} <= set(entry)
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == len(rows)
    assert "| ar |" in (tmp_path / "summary.md").read_text()


def test_draft_modes_are_separate_methods_when_sampling():
    """``--draft-mode beam,sample`` runs each mode as its own method when sampling, only beam search
    when greedy (where the modes coincide); sampled runs of both modes complete with τ >= 1."""
    target = tiny_target("llama")
    torch.manual_seed(0)
    drafter = Drafter(DrafterConfig(hidden_size=64, vocab_size=TINY_VOCAB)).eval()
    greedy = BenchContext(target=target, tokenizer=None, stop_token_ids=(), threads=1)
    methods, _ = build_methods(["redrafter"], greedy, drafters=[("", drafter, [BeamConfig(2, 3)])],
                               draft_modes=("beam", "sample"))
    assert [m.name for m in methods] == ["redrafter[W=2,L=3]"]
    sampling = BenchContext(target=target, tokenizer=None, stop_token_ids=(), threads=1,
                            sampling=SamplingParams(temperature=1.0, seed=3))
    methods, _ = build_methods(["ar", "redrafter"], sampling, drafters=[("", drafter, [BeamConfig(2, 3)])],
                               draft_modes=("beam", "sample"))
    assert [m.name for m in methods] == ["ar", "redrafter[W=2,L=3]", "redrafter[W=2,L=3,sample]"]
    assert [m.engine.proposer.draft_mode for m in methods[1:]] == ["beam", "sample"]
    rows = run_bench([Item(p, 1) for p in PROMPTS], methods, encode=encode, decode=decode, max_new_tokens=8,
                     warmup_tokens=2, progress=False)
    assert len(rows) == 3 * len(PROMPTS) and all(r["num_new_tokens"] == 8 and r["tau"] >= 1.0 for r in rows)


def test_workloads():
    mt = load_workload("mt-bench", turns=(1, 2))
    assert len(mt) == 160 and len({p.category for p, _ in mt}) == 8
    assert len(load_workload("mt-bench", limit=3, categories=["coding"], turns=(1,))) == 3
    assert len(load_workload("humaneval", turns=(1,))) == 164
    sample = [p for p, _ in load_workload("mt-bench", per_category=2, turns=(1,))]
    assert len(sample) == 16 and all(sum(q.category == p.category for q in sample) == 2 for p in sample)
    assert [p.id for p in sample[:2]] == [p.id for p, _ in mt[:2]]  # the first of their category


@pytest.mark.slow
def test_smoke_on_smollm2(smollm2, tmp_path, capsys):
    target, _ = smollm2
    torch.manual_seed(0)
    save_drafter(Drafter(DrafterConfig(hidden_size=target.info.hidden_size, vocab_size=target.info.vocab_size,
                                       exit_dim=64)), tmp_path / "drafter")
    # The drafter's stored setting, tree cap included, is what bench runs without beam flags.
    (tmp_path / "drafter" / "generation.json").write_text('{"beam_width": 4, "beam_length": 5, "max_tree_tokens": 6}')
    code = main(["bench", "--dataset", "mt-bench", "--limit", "2", "--turns", "1", "--max-new-tokens", "16",
                 "--dtype", "float32", "--methods", "hf-generate,ar,redrafter,hf-prompt-lookup",
                 "--min-draft-prob", "0,0.1",
                 "--drafter", str(tmp_path / "drafter"), "--out", str(tmp_path / "out"), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["settings"]["machine"]["threads"] == 2
    methods = summary["methods"]
    assert set(methods) == {"hf-generate", "ar", "redrafter[W=4,L=5,K<=6]", "redrafter[W=4,L=5,p>=0.1,K<=6]",
                            "hf-prompt-lookup"}
    assert methods["redrafter[W=4,L=5,K<=6]"]["identical_to_ar"] == "2/2"
    assert methods["redrafter[W=4,L=5,p>=0.1,K<=6]"]["identical_to_ar"] == "2/2"
    assert methods["hf-generate"]["identical_to_ar"] == "2/2"
    assert methods["ar"]["tau"] == 1.0


@pytest.mark.slow
def test_bench_compares_drafter_weights_in_one_run(tmp_path, capsys):
    """--drafter-weights dense,int4 runs each ReDrafter setting with the bf16 and the 4-bit drafter,
    named apart; in bf16 both give plain decoding's tokens. A bad value is refused."""
    from helpers import require_kernels

    require_kernels("int4")
    args = ["bench", "--dataset", "mt-bench", "--limit", "2", "--turns", "1", "--max-new-tokens", "24",
            "--dtype", "bfloat16", "--methods", "ar,redrafter", "--beam-width", "8", "--beam-length", "3",
            "--max-tree-tokens", "4", "--lookup-tokens", "8", "--extend-prob", "0", "--out", str(tmp_path / "out"),
            "--no-progress"]
    assert main(args + ["--drafter-weights", "dense,int4"]) == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["settings"]["drafter_weights"] == ["dense", "int4"]
    names = ["redrafter[W=8,L=3,K<=4,look=8,drafter=dense]", "redrafter[W=8,L=3,K<=4,look=8,drafter=int4]"]
    assert set(summary["methods"]) == {"ar", *names}
    assert all(summary["methods"][name]["identical_to_ar"] == "2/2" for name in names)
    assert main(args + ["--drafter-weights", "int2"]) == 2
    assert "--drafter-weights takes auto, dense, int4" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_compares_drafters_in_one_run(smollm2, tmp_path, capsys):
    """--drafter A,B runs ReDrafter with each drafter in the same run, interleaved with ar, each with the
    beam setting stored next to it and named '@<directory>'; both give plain decoding's tokens. A
    directory listed twice is refused."""
    target, _ = smollm2
    info = target.info
    for seed, name, setting in ((0, "one", '{"beam_width": 2, "beam_length": 3}'),
                                (1, "two", '{"beam_width": 3, "beam_length": 2, "max_tree_tokens": 3}')):
        torch.manual_seed(seed)
        save_drafter(Drafter(DrafterConfig(hidden_size=info.hidden_size, vocab_size=info.vocab_size, exit_dim=64)),
                     tmp_path / name / "drafter")
        (tmp_path / name / "drafter" / "generation.json").write_text(setting)
    both = f"{tmp_path / 'one' / 'drafter'},{tmp_path / 'two' / 'drafter'}"
    args = ["bench", "--dataset", "mt-bench", "--limit", "2", "--turns", "1", "--max-new-tokens", "12",
            "--dtype", "float32", "--methods", "ar,redrafter", "--out", str(tmp_path / "out"), "--no-progress"]
    assert main(args + ["--drafter", both]) == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    names = ["redrafter[W=2,L=3]@one/drafter", "redrafter[W=3,L=2,K<=3]@two/drafter"]
    assert summary["settings"]["methods"] == ["ar", *names]
    assert summary["settings"]["drafter"] == both.split(",")
    assert all(summary["methods"][name]["identical_to_ar"] == "2/2" for name in names)
    rows = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [row["method"] for row in rows[:3]] == ["ar", *names]  # interleaved prompt by prompt
    assert main(args + ["--drafter", f"{tmp_path / 'one' / 'drafter'},{tmp_path / 'one' / 'drafter'}/"]) == 2
    assert "--drafter lists a directory twice" in capsys.readouterr().err


def test_profile_curve_and_phase_breakdown_on_both_backends():
    from redrafter.bench.profile import phase_breakdown, verify_curve
    from redrafter import BeamConfig, Drafter, DrafterConfig, ReDrafterProposer

    for backend in ("hf", "native"):
        target = tiny_target("llama", backend)
        curve = verify_curve(target, context=20, sizes=[1, 4], repeats=2)
        assert sorted(curve) == [1, 4] and all(v > 0 for v in curve.values())
        torch.manual_seed(0)
        drafter = Drafter(DrafterConfig(hidden_size=64, vocab_size=TINY_VOCAB)).eval()
        proposer = ReDrafterProposer(drafter, target, BeamConfig(width=2, length=3))
        result = phase_breakdown(target, proposer, [3, 1, 4, 1, 5], max_new_tokens=12, stop_ids=())
        assert result["tokens"] == 12 and result["prefill_ms"] > 0
        assert result["tau"] == pytest.approx(11 / result["steps"], abs=1e-3)  # the same steps, after the prefill
        phases = result["ms_per_step"]
        assert {"target forward", "commit", "drafting", "tree packing"} <= set(phases)
        assert all(v >= 0 for v in phases.values())
        assert "propose" not in vars(proposer)  # the timing wrapper is removed again
        plain = phase_breakdown(target, None, [3, 1, 4, 1, 5], max_new_tokens=12, stop_ids=())
        assert plain["tau"] == 1.0 and plain["steps"] == 11 and "drafting" not in plain["ms_per_step"]


@pytest.mark.slow
def test_profile_command_on_smollm2_writes_its_report(smollm2, tmp_path, capsys):
    code = main(["profile", "--backends", "native", "--dtype", "float32", "--context", "16",
                 "--tree-sizes", "1,2", "--beams", "1x2,4x3x3", "--repeats", "1", "--max-new-tokens", "4",
                 "--out", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "out" / "profile.json").read_text())
    entry = next(iter(report["backends"].values()))
    assert sorted(entry["verify_ms"], key=int) == ["1", "2"]
    assert set(entry["phases_redrafter"]) == set(entry["draft_ms"]) == {"1x2", "4x3x3"}
    for parts in entry["forward_parts_ms"].values():
        assert {"products", "rmsnorm", "lm head", "other", "total"} <= set(parts)
        assert sum(v for name, v in parts.items() if name != "total") == pytest.approx(parts["total"], abs=0.01)
    assert sorted(entry["forward_parts_ms"], key=int) == ["1", "2"]


def test_forward_parts_time_each_part_and_leave_the_model_as_it_was():
    from redrafter.bench.profile import forward_parts
    from redrafter.models.base import Linear

    target = tiny_target("llama", "native")
    before = target.forward(torch.tensor([[1, 2, 3]]), torch.arange(3).view(1, 3),
                            torch.ones(3, 3, dtype=torch.bool).tril().view(1, 3, 3), target.new_cache(1)).logits
    parts = forward_parts(target, context=8, sizes=[1, 3], repeats=2)
    assert set(parts) == {1, 3} and all(parts[k]["products"] > 0 and parts[k]["total"] > 0 for k in parts)
    assert "project" not in vars(target) and all(isinstance(layer.qkv, Linear) for layer in target.layers)
    after = target.forward(torch.tensor([[1, 2, 3]]), torch.arange(3).view(1, 3),
                           torch.ones(3, 3, dtype=torch.bool).tril().view(1, 3, 3), target.new_cache(1)).logits
    assert torch.equal(before, after)


def test_profile_tree_kernels_label_their_phases_and_restore_the_setting(smollm2, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("REDRAFTER_TREE_KERNEL", "auto")
    code = main(["profile", "--backends", "native", "--dtype", "float32", "--context", "16", "--tree-sizes", "1",
                 "--beams", "4x3x3", "--tree-kernels", "torch,auto", "--repeats", "1", "--max-new-tokens", "4",
                 "--out", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    entry = next(iter(json.loads((tmp_path / "out" / "profile.json").read_text())["backends"].values()))
    assert set(entry["phases_redrafter"]) == {"4x3x3, tree torch", "4x3x3, tree auto"}
    assert os.environ["REDRAFTER_TREE_KERNEL"] == "auto"
    assert main(["profile", "--tree-kernels", "ours", "--out", str(tmp_path / "bad")]) == 2
    assert "--tree-kernels" in capsys.readouterr().err


def test_markdown_table_shows_paired_statistics_and_only_columns_with_values():
    table = markdown_table({"ar": {"tokens_per_s": 100.0, "speedup_vs_ar": 1.0, "speedup_vs_ar_mean": 1.0,
                                   "speedup_vs_ar_stderr": 0.0},
                            "b": {"tokens_per_s": 150.0, "speedup_vs_ar": 1.4, "speedup_vs_ar_mean": 1.5,
                                  "speedup_vs_ar_stderr": None}})  # one prompt: no standard error
    header, _, ar, b = table.splitlines()
    assert "× hf-generate" not in header and "× ar mean ± s.e." in header  # hf-generate did not run
    assert "| 1.000 ± 0.000 |" in ar and "| 1.500 |" in b and "±" not in b


def test_grid_plot_groups_cells_by_their_other_settings(tmp_path):
    """Names carry the cap, lookup and floor after L=..; the τ grid is drawn per group of those settings."""
    from redrafter.bench.methods import redrafter_name

    methods = {"ar": {"tau": 1.0}}
    for k in (5, 8):
        for w, n in [(4, 3), (8, 3), (8, 4)]:
            name = redrafter_name(BeamConfig(width=w, length=n, max_tree_tokens=k, lookup_tokens=8))
            methods[name] = {"tau": w + n / 10 + k / 100, "tokens_per_s": 10.0 * w}
    methods[redrafter_name(BeamConfig(width=2, length=3, min_prob=0.1))] = {"tau": 1.5}  # a group of one: no plot
    groups = grid_cells(methods)
    assert set(groups) == {",K<=5,look=8", ",K<=8,look=8", ",p>=0.1"}
    assert groups[",K<=8,look=8"][(8, 4)]["tau"] == pytest.approx(8.48)
    assert set(groups[",K<=5,look=8"]) == {(4, 3), (8, 3), (8, 4)}
    assert plot_grid(tmp_path / "g.png", methods) == [tmp_path / "g.png"]
    assert (tmp_path / "g.png").stat().st_size > 0
    assert plot_grid(tmp_path / "none.png", {"ar": {"tau": 1.0}}) == []


def test_cpu_identity_reads_the_first_processor(tmp_path):
    """Two CPUs a VM names alike ("AMD EPYC") differ in family, model and instruction sets: the bench
    records them, from the first processor's block only."""
    from redrafter.bench.runner import cpu_identity

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
                       "model name\t: AMD EPYC\nstepping\t: 1\ncpu MHz\t\t: 2596.134\n"
                       "flags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n\n"
                       "processor\t: 1\ncpu family\t: 26\nflags\t\t: amx_tile\n")
    assert cpu_identity(str(cpuinfo)) == {
        "cpu": "AMD EPYC", "cpu_vendor": "AuthenticAMD", "cpu_family": "25", "cpu_model": "17", "cpu_stepping": "1",
        "cpu_mhz": "2596.134", "cpu_flags": ["avx2", "avx512f", "avx512_bf16", "avx512_vnni"]}
    assert cpu_identity(str(tmp_path / "missing")) == {}


def test_every_command_refuses_an_output_path_that_is_a_file_before_running(tmp_path, capsys):
    """bench, profile, datagen and train check --out before any work, so a finished run is never
    lost to an --out that is a file; bench refuses a method listed twice or none; datagen a
    temperature that generate would refuse."""
    taken = tmp_path / "taken"
    taken.write_text("not a directory")
    prompts = tmp_path / "p.txt"
    prompts.write_text("Say hi.\n")
    data = tmp_path / "data"
    data.mkdir()
    cases = [
        (["bench", "--dataset", str(prompts), "--methods", "ar", "--out", str(taken)], f"--out {taken} exists and is not a directory"),
        (["profile", "--backends", "native", "--out", str(taken)], "is not a directory"),
        (["datagen", "--dataset", str(prompts), "--out", str(taken)], "is not a directory"),
        (["train", "--data", str(data), "--out", str(taken)], "is not a directory"),
        (["bench", "--dataset", str(prompts), "--methods", "ar,ar", "--out", str(tmp_path / "o")], "lists a method twice"),
        (["bench", "--dataset", str(prompts), "--methods", ",", "--out", str(tmp_path / "o")], "names no method"),
        (["datagen", "--dataset", str(prompts), "--temperature", "-1", "--out", str(tmp_path / "d")],
         "temperature must be a finite number >= 0"),
    ]
    for args, message in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err, (args, err)
    assert taken.read_text() == "not a directory" and not (tmp_path / "o").exists() and not (tmp_path / "d").exists()

"""The ``redrafter generate`` contract: --json fields, prompts files, and bad input."""

import json
import subprocess
import sys

import pytest
import torch

from redrafter import Drafter, DrafterConfig, save_drafter
from redrafter.cli import main, read_prompts
from redrafter.errors import RedrafterError

JSON_FIELDS = {"prompt", "text", "token_ids", "num_new_tokens", "num_steps", "tokens_per_step", "elapsed_s",
               "tokens_per_s"}


@pytest.fixture(scope="module")
def smollm2_drafter(tmp_path_factory, smollm2):
    target, _ = smollm2
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("drafter") / "random"
    save_drafter(Drafter(DrafterConfig(hidden_size=target.info.hidden_size, vocab_size=target.info.vocab_size,
                                       exit_dim=64)), path)
    return path


def run_json(capsys, *args):
    code = main(["generate", "--json", *args])
    out = capsys.readouterr()
    assert code == 0, out.err
    return [json.loads(line) for line in out.out.splitlines()]


@pytest.mark.slow
def test_json_contract_speculative_equals_autoregressive(capsys, smollm2, smollm2_drafter, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "Name two planets."}) + "\n\n" + json.dumps({"prompt": "Say hi."}) + "\n")
    # float32: the lossless contract (in bf16 the two paths round differently: plain decoding attends
    # on a float32 cache, docs/PERFORMANCE.md)
    common = ["--prompts-file", str(prompts), "--max-new-tokens", "20", "--threads", "2", "--dtype", "float32"]
    ar = run_json(capsys, *common, "--autoregressive")
    spec = run_json(capsys, *common, "--drafter", str(smollm2_drafter), "--beam-width", "3", "--beam-length", "4")
    assert [r["prompt"] for r in ar] == ["Name two planets.", "Say hi."]
    for a, s in zip(ar, spec):
        assert JSON_FIELDS <= set(a) and JSON_FIELDS <= set(s)
        assert a["token_ids"] == s["token_ids"] and a["text"] == s["text"]
        assert a["num_new_tokens"] == len(a["token_ids"]) <= 20
        assert a["num_steps"] == a["num_new_tokens"] - 1 and a["tokens_per_step"] == 1.0
        assert s["tokens_per_step"] == pytest.approx((s["num_new_tokens"] - 1) / s["num_steps"], abs=1e-3)
        assert s["tokens_per_s"] > 0 and s["elapsed_s"] > 0


@pytest.mark.slow
def test_streamed_text_and_stats_line(capsys, smollm2):
    assert main(["generate", "--autoregressive", "--prompt", "Count from one to five.", "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr()
    assert out.out.strip()
    assert "tau=1.00 tokens/step" in out.err and "tokens/s" in out.err


def test_read_prompts_plain_and_jsonl(tmp_path):
    """Plain text: every non-blank line is a prompt as it stands, one that starts with "{" included;
    JSONL (by suffix, or by a first line that is a JSON object): every line's "prompt"; a UTF-8
    byte-order mark is not part of the first prompt."""
    text = tmp_path / "p.txt"
    text.write_text("first prompt\n\nsecond prompt\n")
    assert read_prompts(["a"], str(text)) == ["a", "first prompt", "second prompt"]
    code = tmp_path / "code.txt"
    code.write_text("What does this do?\n{x * x for x in range(3)} -- and this?\n")
    assert read_prompts([], str(code)) == ["What does this do?", "{x * x for x in range(3)} -- and this?"]
    records = tmp_path / "p.data"
    records.write_bytes(b"\xef\xbb\xbf" + b'{"prompt": "hi", "id": "a"}\n{"prompt": "caf\xc3\xa9"}\n')
    assert read_prompts([], str(records)) == ["hi", "caf\u00e9"]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "one"}\nnot json\n')
    with pytest.raises(RedrafterError, match=r"p.jsonl:2: invalid JSON"):
        read_prompts([], str(jsonl))


BAD_INPUTS = [
    (["--autoregressive", "--model", "/no/such/model", "--prompt", "hi"], "model not found"),
    (["--drafter", "/no/such/drafter", "--prompt", "hi"], "drafter directory not found"),
    (["--beam-length", "1", "--prompt", "hi"], "beam length must be >= 2"),
    (["--autoregressive", "--prompt", "   "], "prompt 1 is empty"),
    (["--autoregressive"], "no prompt given"),
    (["--model", "some/model/dir", "--prompt", "hi"], "model not found: 'some/model/dir'"),
    (["--autoregressive", "--prompt", "hi", "--temperature", "nan"], "temperature must be a finite number >= 0"),
    (["--autoregressive", "--prompt", "hi", "--temperature", "inf"], "temperature must be a finite number >= 0"),
    (["--autoregressive", "--prompt", "hi", "--device", "banana"], "unknown device 'banana'"),
    (["--autoregressive", "--prompt", "hi", "--lookup-ngram", "0"], "--lookup-ngram) must be >= 1, got 0"),
    (["--autoregressive", "--prompt", "hi", "--max-new-tokens", "0"], "max-new-tokens must be >= 1"),
    (["--autoregressive", "--prompt", "hi", "--backend", "hf", "--compile"], "--compile needs the native backend"),
    (["--autoregressive", "--prompt", "hi", "--draft-mode", "greedy"], "--draft-mode must be one of beam, sample, tree"),
    (["--autoregressive", "--prompt", "hi", "--draft-mode", "beam,sample"], "--draft-mode takes one mode"),
    (["--autoregressive", "--prompt", "hi", "--min-draft-prob", "1.5"], "--min-draft-prob must be a probability"),
    (["--autoregressive", "--prompt", "hi", "--min-draft-prob", "x"], "--min-draft-prob must be a probability"),
    (["--autoregressive", "--prompt", "hi", "--min-draft-prob", "0.1,0.2"], "--min-draft-prob takes one value"),
    (["--autoregressive", "--prompt", "hi", "--max-tree-tokens", "1"], "--max-tree-tokens must be 0"),
    (["--autoregressive", "--prompt", "hi", "--max-tree-tokens", "x"], "--max-tree-tokens must be 0"),
    (["--autoregressive", "--prompt", "hi", "--max-tree-tokens", "8,16"], "--max-tree-tokens takes one value"),
    (["--autoregressive", "--prompt", "hi", "--min-tokens-per-step", "0.5"], "--min-tokens-per-step must be 0"),
    (["--autoregressive", "--prompt", "hi", "--min-tokens-per-step", "1.5,2"], "--min-tokens-per-step takes one"),
    (["--autoregressive", "--prompt", "hi", "--beam-length", "3", "--min-tokens-per-step", "9"],
     "min tokens per step must be 0"),
    (["--autoregressive", "--prompt", "hi", "--extend-prob", "1"], "--extend-prob must be a probability"),
    (["--autoregressive", "--prompt", "hi", "--extend-prob", "0.3,0.5"], "--extend-prob takes one value"),
]


@pytest.mark.parametrize("args,message", BAD_INPUTS)
def test_bad_input_clear_message(capsys, args, message):
    assert main(["generate", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_bad_files_clear_message(capsys, tmp_path):
    """Files that are not what a flag needs: a prompts file that is a directory, not UTF-8, or holds
    no prompt; a drafter that is a file; a model directory without a drafter shipped for it."""
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"hello\n\xff\xfe\x00 bytes\n")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n")
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    cases = [(["--prompts-file", str(tmp_path)], "is a directory"),
             (["--prompts-file", str(binary)], "is not UTF-8 text (byte 6"),
             (["--prompts-file", str(blank)], "holds no prompt"),
             (["--drafter", str(binary), "--prompt", "hi"], "is a file; a drafter is a directory"),
             (["--model", str(model_dir), "--prompt", "hi"], "no drafter ships for model")]
    for args, message in cases:
        assert main(["generate", *args]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, (args, err)


@pytest.mark.slow
def test_too_long_prompt_is_named_before_anything_is_generated(capsys, smollm2, tmp_path):
    """A prompts file whose second prompt does not fit the model's positions fails before the first
    is answered, naming prompt 2 and how many new tokens would fit."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("Say hi.\n" + "word " * 9000 + "\n")
    assert main(["generate", "--autoregressive", "--prompts-file", str(prompts), "--max-new-tokens", "8",
                 "--dtype", "float32"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.startswith("error: prompt 2 (") and "exceed the model's 8192 positions" in out.err


@pytest.mark.slow
def test_output_into_a_closed_pipe_stops_quietly(tmp_path):
    """`redrafter generate ... | head -n 1`: once the reader has gone, the process stops without a
    traceback (status 141, as a process stopped by SIGPIPE)."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("Count to ten.\n" * 4)
    proc = subprocess.Popen([sys.executable, "-m", "redrafter", "generate", "--autoregressive", "--json",
                             "--prompts-file", str(prompts), "--max-new-tokens", "24", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stdout.readline()
    proc.stdout.close()
    _, err = proc.communicate(timeout=300)
    assert json.loads(first)["prompt"] == "Count to ten."
    assert proc.returncode == 141 and b"Traceback" not in err, err.decode()


@pytest.mark.slow
def test_bad_drafters_against_the_real_model(capsys, smollm2, tmp_path):
    target, _ = smollm2
    save_drafter(Drafter(DrafterConfig(hidden_size=64, vocab_size=target.info.vocab_size)), tmp_path / "small")
    save_drafter(Drafter(DrafterConfig(hidden_size=target.info.hidden_size, vocab_size=1000, exit_dim=8)),
                 tmp_path / "vocab")
    corrupt = tmp_path / "corrupt"
    save_drafter(Drafter(DrafterConfig(hidden_size=target.info.hidden_size, vocab_size=1000, exit_dim=8)), corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x00garbage")
    for path, message in [("small", "hidden_size 64 does not match model"),
                          ("vocab", "vocab_size 1000 does not match model"),
                          ("corrupt", "cannot read drafter weights")]:
        assert main(["generate", "--drafter", str(tmp_path / path), "--prompt", "hi"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err


def test_subprocess_exit_code_and_no_traceback(tmp_path):
    corrupt = tmp_path / "m"
    corrupt.mkdir()
    (corrupt / "config.json").write_text("{not json")
    proc = subprocess.run([sys.executable, "-m", "redrafter", "generate", "--autoregressive", "--model", str(corrupt),
                           "--prompt", "hi"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: cannot load model") and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_sampling_flags_seeded_and_independent_per_prompt(capsys, smollm2, smollm2_drafter, tmp_path):
    prompts = tmp_path / "same.txt"
    prompts.write_text("Tell me a one-line story.\n" * 3)
    common = ["--prompts-file", str(prompts), "--max-new-tokens", "12", "--temperature", "1.0", "--top-p", "0.95",
              "--top-k", "50"]
    speculative = ["--drafter", str(smollm2_drafter), "--beam-width", "2", "--beam-length", "3"]
    for mode in (["--autoregressive"], speculative, [*speculative, "--draft-mode", "sample"]):
        first = run_json(capsys, *common, *mode, "--seed", "7")
        again = run_json(capsys, *common, *mode, "--seed", "7")
        other = run_json(capsys, *common, *mode, "--seed", "8")
        assert [r["token_ids"] for r in first] == [r["token_ids"] for r in again]  # reproducible
        assert len({tuple(r["token_ids"]) for r in first}) == 3  # the same prompt 3 times: 3 samples
        assert [r["token_ids"] for r in first] != [r["token_ids"] for r in other]
        assert first[0]["temperature"] == 1.0 and first[0]["seed"] == 7
        assert first[0]["top_k"] == 50 and first[0]["top_p"] == 0.95  # the whole transform, to repeat the run
    # Without --seed each run draws its own seed, recorded so that the run can be repeated.
    unseeded = [run_json(capsys, *common, "--autoregressive") for _ in range(2)]
    seeds = [run[0]["seed"] for run in unseeded]
    assert all(isinstance(s, int) for s in seeds) and seeds[0] != seeds[1]
    repeated = run_json(capsys, *common, "--autoregressive", "--seed", str(seeds[0]))
    assert [r["token_ids"] for r in repeated] == [r["token_ids"] for r in unseeded[0]]


@pytest.mark.slow
def test_shipped_drafter_is_used_by_default_and_lossless(capsys, smollm2):
    """The default model ships a trained drafter: generate picks it (and its measured beam setting)
    without --drafter, and its output equals plain decoding token for token."""
    from redrafter.drafter.model import recommended_beam
    from redrafter.models.loading import DEFAULT_MODEL, shipped_drafter

    path = shipped_drafter(DEFAULT_MODEL)
    assert path is not None and sum(f.stat().st_size for f in path.iterdir()) <= 30 * 2**20
    from redrafter.models import kernels

    # float32: --weights auto takes the file's 4-bit weights where our AVX2 kernel runs, else the dense ones
    weights = "int4" if kernels.avx2() is not None else "dense"
    beam = recommended_beam(path, "int4:avx2" if weights == "int4" else "dense")
    assert beam is not None
    common = ["--prompt", "Describe a rainbow to a child.", "--max-new-tokens", "48", "--dtype", "float32"]
    (ar,) = run_json(capsys, *common, "--autoregressive")
    (spec,) = run_json(capsys, *common)
    assert spec["weights"] == ar["weights"] == weights
    assert spec["mode"] == "redrafter" and (spec["beam_width"], spec["beam_length"]) == (beam.width, beam.length)
    assert spec["max_tree_tokens"] == beam.max_tree_tokens
    assert spec["token_ids"] == ar["token_ids"]
    assert spec["tokens_per_step"] > 1.2  # a trained drafter gets drafted tokens accepted on a chat prompt


def test_drafter_problems_are_found_before_the_model_loads(capsys, tmp_path, monkeypatch):
    """A corrupt drafter or a bad --drafter-weights fails before the (slow) model load; --drafter
    with --autoregressive is reported as unused."""
    import redrafter.models.loading as loading

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(loading, "load_target", no_load)
    corrupt = tmp_path / "corrupt"
    save_drafter(Drafter(DrafterConfig(hidden_size=64, vocab_size=100, exit_dim=8)), corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x00garbage")
    assert main(["generate", "--drafter", str(corrupt), "--prompt", "hi"]) == 2
    assert "cannot read drafter weights" in capsys.readouterr().err
    save_drafter(Drafter(DrafterConfig(hidden_size=64, vocab_size=100, exit_dim=8)), tmp_path / "good")
    assert main(["generate", "--drafter", str(tmp_path / "good"), "--drafter-weights", "int8", "--prompt", "hi"]) == 2
    assert "--drafter-weights takes auto, dense, int4" in capsys.readouterr().err
    with pytest.raises(AssertionError, match="the model was loaded"):
        main(["generate", "--autoregressive", "--drafter", str(tmp_path / "good"), "--prompt", "hi"])
    assert "note: --drafter is not used with --autoregressive" in capsys.readouterr().err


def test_an_empty_prompt_in_a_jsonl_file_is_named_by_its_line(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "one"}\n\n{"prompt": "  "}\n')
    with pytest.raises(RedrafterError, match=r"p.jsonl:3: the prompt is empty"):
        read_prompts([], str(jsonl))

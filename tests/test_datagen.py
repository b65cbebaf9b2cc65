"""datagen: the target writes answers in resumable shards; benchmark prompts never enter."""

import json

import pytest

from redrafter.bench.workloads import mt_bench
from redrafter.cli import main
from redrafter.training.datagen import read_records
from redrafter.training.prompts import iter_json_array, load_training_prompts, normalise


def test_truncated_json_array_is_read_record_by_record():
    text = '[{"a": 1}, {"a": 2},\n {"a": 3, "b": "trunc'
    assert list(iter_json_array(text)) == [{"a": 1}, {"a": 2}]


def test_benchmark_prompts_are_excluded(tmp_path):
    question = mt_bench()[0].turns[0]
    prompts = tmp_path / "p.txt"
    prompts.write_text(f"A fresh question about rivers.\n{question.upper()}\n  {question}  \nAnother one?\n"
                       f"another one ?\n?!\n{'long ' * 900}\n")
    dropped = {}
    kept = [text for _, text, _ in load_training_prompts(str(prompts), dropped=dropped)]
    assert sorted(kept) == ["A fresh question about rivers.", "Another one?"]
    assert dropped == {"benchmark": 2, "duplicate": 1, "empty": 1, "too_long": 1}
    assert normalise("Hello,   World!") == "hello world"


def test_datagen_on_benchmark_prompts_only_says_why_before_loading_a_model(tmp_path, capsys):
    prompts = tmp_path / "bench.txt"
    prompts.write_text("".join(p.turns[0].replace("\n", " ") + "\n" for p in mt_bench()[:3]) + "\n")
    # a model that does not exist: the error must come before any load
    code = main(["datagen", "--dataset", str(prompts), "--out", str(tmp_path / "d"), "--model", str(tmp_path / "none")])
    assert code != 0
    err = capsys.readouterr().err
    assert "no prompts to answer" in err and "HumanEval, kept out of training data) 3," in err
    assert not (tmp_path / "d").exists()  # nothing written: a corrected file may use the same --out
    prompts.write_text("A fresh question about rivers.\n")
    assert main(["datagen", "--dataset", str(prompts), "--out", str(tmp_path / "d"), "--model", str(tmp_path / "none")]) == 2
    assert "model not found" in capsys.readouterr().err
    assert not (tmp_path / "d" / "meta.json").exists()  # a model that fails to load leaves no settings behind


@pytest.mark.slow
def test_datagen_writes_shards_and_resumes(tmp_path, smollm2, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Name a colour number {i}."}) + "\n" for i in range(6)))
    common = ["datagen", "--dataset", str(prompts), "--out", str(tmp_path / "d"), "--max-new-tokens", "8",
              "--batch-size", "2", "--shard-size", "2", "--dtype", "float32", "--no-progress"]
    assert main([*common, "--num-prompts", "4"]) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["new_records"] == 4 and len(list((tmp_path / "d").glob("shard-*.jsonl"))) == 2
    assert main([*common, "--num-prompts", "6"]) == 0  # resumes: only the two missing prompts run
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert second["new_records"] == 2 and second["records"] == 6
    records = read_records(tmp_path / "d")
    assert len({r["id"] for r in records}) == 6
    for r in records:
        assert 1 <= len(r["response_ids"]) <= 8 and r["prompt_ids"][-3:] and r["finish_reason"] in ("stop", "length")
    with_states = read_records(tmp_path / "d", with_states=True)
    assert len(list((tmp_path / "d").glob("shard-*.states.safetensors"))) == 3
    assert all(r["states"].shape == (len(r["response_ids"]), 576) for r in with_states)
    assert main([*common, "--num-prompts", "6", "--temperature", "0.5"]) == 2  # other settings: refused
    assert "other settings" in capsys.readouterr().err
    # A deleted shard (the repair for a corrupt one) is answered again into a new shard after the last:
    # no finished shard is overwritten.
    directory = tmp_path / "d"
    kept = {p.name: p.read_bytes() for p in directory.glob("shard-*")}
    gone = [name for name in kept if name.startswith("shard-00001")]
    for name in gone:
        (directory / name).unlink()
    assert main([*common, "--num-prompts", "6"]) == 0
    third = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert third["new_records"] == 2 and third["records"] == 6
    assert all((directory / name).read_bytes() == data for name, data in kept.items() if name not in gone)
    assert (directory / "shard-00003.jsonl").is_file()
    # A torn shard is named, with the repair, instead of a traceback.
    shard = directory / "shard-00002.jsonl"
    shard.write_bytes(shard.read_bytes()[:30])
    assert main([*common, "--num-prompts", "6"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: corrupt data shard") and "shard-00002.jsonl" in err and "delete it" in err

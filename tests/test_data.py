"""Data layer: every defect reported with its line, exactly the valid records written, same output from every input kind.

And for training: token ids (one BOS, EOS last), the completion mask, collated labels, overlong rows dropped.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import MISTRAL_TOKENIZER, ONE_STEP, WORDS, patch_trainer, tiny_cfg

from qlora_llm.cli import main
from qlora_llm.config import load_config
from qlora_llm.data import OUTPUT_FILES, PrepareError, prepare, read_jsonl, tokenize_examples
from qlora_llm.train import train

TOKENIZER = str(MISTRAL_TOKENIZER)


def cfg(**data):
    overrides = [f"model.name={TOKENIZER}"] + [f"data.{k}={v}" for k, v in data.items()]
    return load_config(None, overrides)


def good(i: int) -> dict:
    return {
        "instruction": f"Summarize paper {i}.",
        "input": f"Paper {i} studies adapters.",
        "output": f"Adapters {i}.",
    }


GOOD = [good(i) for i in range(12)]


def jl(obj) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def defect_file(path: Path) -> dict[int, str]:
    """Write one of each defect; return {line: kind} of what must be reported."""
    long_input = "word " * 800
    lines = (
        [
            b"\xef\xbb\xbf" + json.dumps(GOOD[0]).encode() + b"\r\n",  # 1: BOM + CRLF: accepted
            json.dumps(GOOD[1]).encode() + b"\r\n",  # 2: CRLF: accepted
            b'{"instruction": "x", "output": \n',  # 3: invalid JSON
            b'{"instruction": "caf\xe9", "output": "y"}\n',  # 4: invalid UTF-8 (latin-1 byte)
            jl({"instruction": "Q only"}),  # 5: missing output
            jl({"instruction": "Q", "output": "   "}),  # 6: empty output
            jl({"instruction": "Q", "output": 5}),  # 7: wrong type
            jl(
                {"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]}
            ),  # 8: role
            jl({"messages": [{"role": "user", "content": "hi"}]}),  # 9: no assistant turn
            jl(GOOD[1]),  # 10: duplicate of line 2
            jl({"instruction": "Summarize.", "input": long_input, "output": "Long."}),  # 11: too long
            b"\n",  # 12: blank: not a record
            jl(
                {
                    "messages": [
                        {"role": "system", "content": "Be brief."},
                        {"role": "user", "content": "2+2?"},
                        {"role": "assistant", "content": "4"},
                    ]
                }
            ),  # 13: valid chat
            jl(["not", "an", "object"]),  # 14: not an object
            jl({"question": "?", "answer": "!"}),  # 15: unknown shape
        ]
        + [jl(g) for g in GOOD[2:]]
    )  # 16..25: valid
    path.write_bytes(b"".join(lines))
    return {
        3: "json",
        4: "encoding",
        5: "missing",
        6: "empty",
        7: "type",
        8: "role",
        9: "no_assistant",
        10: "duplicate",
        11: "overlength",
        14: "type",
        15: "shape",
    }


def test_every_defect_reported_with_line_and_only_valid_records_written(tmp_path):
    raw = tmp_path / "raw.jsonl"
    expected = defect_file(raw)
    leak = tmp_path / "eval.jsonl"
    leak.write_bytes(jl({**GOOD[5], "output": "another answer"}) + jl(good(100)))  # line 1 leaks from train

    report = prepare(cfg(max_seq_length=256), [raw], tmp_path / "out", eval_inputs=[leak])

    got = {p.line: p.kind for p in report.problems if p.file == str(raw)}
    assert got == expected
    assert [(p.line, p.kind) for p in report.problems if p.file == str(leak)] == [(1, "eval_leak")]
    by_line = {p.line: p for p in report.problems if p.file == str(raw)}
    assert str(by_line[3]).startswith(f"{raw}:3: invalid JSON at column 32")
    assert "invalid UTF-8 at byte" in str(by_line[4]) and "0xe9" in str(by_line[4])
    assert str(by_line[7]) == (
        f'{raw}:7: output: \'output\' must be a string, got int (5). Quote it: "output": "5".'
    )
    assert str(by_line[8]).startswith(f"{raw}:8: messages[0].role: unknown role 'bot'")
    assert "duplicate of " + f"{raw}:2" in str(by_line[10])
    assert by_line[11].message.endswith("tokens > max_seq_length 256; dropped")

    train = read_jsonl(tmp_path / "out" / "train.jsonl")
    assert train == [
        *GOOD[:2],
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"},
            ]
        },
        *GOOD[2:],
    ]
    assert read_jsonl(tmp_path / "out" / "eval.jsonl") == [good(100)]
    # Nothing is lost silently: records in = written + reported.
    assert report.records_read == 26
    assert report.records_read == (
        report.train_written
        + report.eval_written
        + report.invalid
        + report.duplicates
        + report.overlength_dropped
        + report.eval_leaks_removed
    )
    on_disk = json.loads((tmp_path / "out" / "prepare_report.json").read_text())
    assert on_disk["problems_total"] == len(report.problems) == 12
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(OUTPUT_FILES)


def test_nothing_valid_leaves_no_output(tmp_path):
    raw = tmp_path / "bad.jsonl"
    raw.write_bytes(jl({"instruction": "Q"}) + b"{oops\n")
    with pytest.raises(PrepareError, match=r"no valid examples in .*bad.jsonl \(2 read, 2 invalid\)"):
        prepare(cfg(), [raw], tmp_path / "out")
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_too_few_examples_is_an_error_and_writes_nothing(tmp_path):
    raw = tmp_path / "few.jsonl"
    raw.write_bytes(b"".join(jl(g) for g in GOOD[:3]))
    with pytest.raises(PrepareError, match="only 3 valid training example.*min_examples=10"):
        prepare(cfg(), [raw], tmp_path / "out")
    assert not (tmp_path / "out" / "train.jsonl").exists()
    assert len(prepare(cfg(min_examples=3), [raw], tmp_path / "out").outputs) == 3


def _write_all_kinds(folder: Path, records: list[dict]) -> dict[str, Path]:
    folder.mkdir()
    paths = {}
    paths["jsonl"] = folder / "r.jsonl"
    paths["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in records))
    paths["json"] = folder / "r.json"
    paths["json"].write_text(json.dumps(records, indent=2))
    paths["csv"] = folder / "r.csv"
    with open(paths["csv"], "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["instruction", "input", "output"])
        w.writeheader()
        w.writerows(records)
    paths["tsv"] = folder / "r.tsv"
    with open(paths["tsv"], "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["instruction", "input", "output"], delimiter="\t")
        w.writeheader()
        w.writerows(records)
    import datasets

    datasets.Dataset.from_list(records).save_to_disk(str(folder / "hf"))
    paths["hf"] = folder / "hf"
    datasets.Dataset.from_list(records).to_parquet(str(folder / "r.parquet"))
    paths["parquet"] = folder / "r.parquet"
    return paths


def test_every_input_kind_gives_identical_jsonl(tmp_path):
    records = [*GOOD, {"instruction": 'Multi\nline, "quoted"', "input": "", "output": "Ünïcode ✓"}]
    outputs = {}
    for kind, path in _write_all_kinds(tmp_path / "in", records).items():
        prepare(cfg(), [path], tmp_path / kind)
        outputs[kind] = (tmp_path / kind / "train.jsonl").read_bytes()
    assert len(set(outputs.values())) == 1, {k: v[:80] for k, v in outputs.items()}
    assert read_jsonl(tmp_path / "jsonl" / "train.jsonl") == records


def test_prompt_completion_and_mapped_csv_columns(tmp_path):
    pc = tmp_path / "pc.jsonl"
    pc.write_text(
        "".join(json.dumps({"prompt": g["instruction"], "completion": g["output"]}) + "\n" for g in GOOD)
    )
    mapped = tmp_path / "qa.csv"
    with open(mapped, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["question", "answer", "extra"])
        w.writerows([g["instruction"], g["output"], "x"] for g in GOOD)
    prepare(cfg(), [pc], tmp_path / "a")
    prepare(cfg(), [mapped], tmp_path / "b", columns={"instruction": "question", "output": "answer"})
    a = (tmp_path / "a" / "train.jsonl").read_bytes()
    assert a == (tmp_path / "b" / "train.jsonl").read_bytes()
    assert read_jsonl(tmp_path / "a" / "train.jsonl")[0] == {**GOOD[0], "input": ""}


def test_csv_rows_report_their_line_and_bad_column_mapping(tmp_path):
    path = tmp_path / "rows.csv"
    body = "instruction,input,output\n" + "".join(f"Q{i},,A{i}\n" for i in range(11))
    body += '"multi\nline",,\n'  # a record on lines 13-14 with an empty output
    path.write_text(body)
    report = prepare(cfg(), [path], tmp_path / "out")
    assert [(p.line, p.field, p.kind) for p in report.problems] == [(13, "output", "empty")]
    with pytest.raises(PrepareError):
        prepare(cfg(), [path], tmp_path / "out2", columns={"output": "answer"})


def test_existing_output_needs_force(tmp_path):
    raw = tmp_path / "r.jsonl"
    raw.write_text("".join(json.dumps(g) + "\n" for g in GOOD))
    prepare(cfg(), [raw], tmp_path / "out")
    with pytest.raises(PrepareError, match="already exists; pass --force"):
        prepare(cfg(), [raw], tmp_path / "out")
    raw.write_text("".join(json.dumps(g) + "\n" for g in GOOD[1:]))
    prepare(cfg(), [raw], tmp_path / "out", force=True)
    assert len(read_jsonl(tmp_path / "out" / "train.jsonl")) == 11


def test_eval_split_is_seeded_and_disjoint(tmp_path):
    raw = tmp_path / "r.jsonl"
    records = [good(i) for i in range(40)]
    raw.write_text("".join(json.dumps(g) + "\n" for g in records))
    r1 = prepare(cfg(), [raw], tmp_path / "a", eval_fraction=0.25)
    prepare(cfg(), [raw], tmp_path / "b", eval_fraction=0.25)
    assert (r1.train_written, r1.eval_written) == (30, 10)
    train, evals = read_jsonl(tmp_path / "a" / "train.jsonl"), read_jsonl(tmp_path / "a" / "eval.jsonl")
    assert (tmp_path / "a" / "eval.jsonl").read_bytes() == (tmp_path / "b" / "eval.jsonl").read_bytes()
    assert sorted(map(json.dumps, train + evals)) == sorted(map(json.dumps, records))


def test_overlength_policies(tmp_path):
    raw = tmp_path / "r.jsonl"
    long = {"instruction": "Summarize.", "input": "The adapter is small. " * 60, "output": "Small adapter."}
    raw.write_text("".join(json.dumps(g) + "\n" for g in [*GOOD, long]))
    dropped = prepare(cfg(max_seq_length=64), [raw], tmp_path / "drop")
    assert (dropped.train_written, dropped.overlength_dropped) == (12, 1)

    truncated = prepare(cfg(max_seq_length=64, overlength="truncate"), [raw], tmp_path / "trunc")
    assert (truncated.train_written, truncated.truncated) == (13, 1)
    kept = read_jsonl(tmp_path / "trunc" / "train.jsonl")[-1]
    assert kept["output"] == "Small adapter." and kept["input"].startswith("The adapter is small.")
    assert truncated.token_lengths["max"] <= 64

    with pytest.raises(PrepareError, match="longer than max_seq_length 64 and data.overlength=error"):
        prepare(cfg(max_seq_length=64, overlength="error"), [raw], tmp_path / "err")
    assert not (tmp_path / "err" / "train.jsonl").exists()


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    import qlora_llm.data as data

    raw = tmp_path / "r.jsonl"
    raw.write_text("".join(json.dumps(g) + "\n" for g in GOOD))
    calls = {"n": 0}
    real_dump = data._dump

    def crash_midway(record):
        calls["n"] += 1
        if calls["n"] > len(GOOD) + 5:  # after the duplicate check, halfway through writing train.jsonl
            raise OSError("disk full")
        return real_dump(record)

    monkeypatch.setattr(data, "_dump", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        prepare(cfg(), [raw], tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []  # no train.jsonl, no temporary left behind


def test_hub_dataset_offline_is_one_clear_sentence(tmp_path, monkeypatch):
    import qlora_llm.model as model

    monkeypatch.setattr(model, "_hub_reachable", lambda: False)
    with pytest.raises(
        PrepareError,
        match=r"'tatsu-lab/alpaca' is not a file or folder here, and the Hugging "
        r"Face Hub cannot be reached .*save_to_disk",
    ):
        prepare(cfg(), ["tatsu-lab/alpaca"], tmp_path / "out")


def test_cli_prepare_exit_codes_and_messages(tmp_path, capsys):
    raw = tmp_path / "r.jsonl"
    raw.write_bytes(b"".join(jl(g) for g in GOOD) + b"{broken\n")
    args = ["prepare", str(raw), "--output-dir", str(tmp_path / "out"), "--model", TOKENIZER]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert "wrote 12 train, 0 eval; 1 invalid" in out
    assert f"error: {raw}:13: invalid JSON at column 2" in err
    assert main(args) == 1
    assert "already exists; pass --force" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"{broken\n")
    assert main(["prepare", str(bad), "--output-dir", str(tmp_path / "o2"), "--model", TOKENIZER]) == 1
    assert "no valid examples" in capsys.readouterr().err
    assert (
        main(["prepare", str(raw), "--output-dir", str(tmp_path / "o3"), "--model", TOKENIZER, "--strict"])
        == 1
    )
    assert not (tmp_path / "o3" / "train.jsonl").exists()


def test_prepare_with_the_defaults_works_offline(tmp_path, capsys):
    """No --model: the seed's Mistral-7B-Instruct-v0.2, whose tokenizer ships with the package."""
    raw = tmp_path / "r.jsonl"
    raw.write_bytes(b"".join(jl(g) for g in GOOD))
    assert main(["prepare", str(raw), "--output-dir", str(tmp_path / "out")]) == 0
    out, err = capsys.readouterr()
    assert "tokens per example (mistralai/Mistral-7B-Instruct-v0.2, template mistral)" in out
    assert "the Hugging Face Hub cannot be reached; using the copy of its tokenizer shipped with" in err
    report = json.loads((tmp_path / "out" / "prepare_report.json").read_text())
    assert report["example"]["text"].startswith("<s>[INST] Summarize paper 0.")


def test_problem_list_is_capped_on_the_terminal(tmp_path, capsys):
    raw = tmp_path / "r.jsonl"
    raw.write_bytes(b"".join(jl(g) for g in GOOD) + b"{broken\n" * 30)
    assert main(["prepare", str(raw), "--output-dir", str(tmp_path / "out"), "--model", TOKENIZER]) == 0
    err = capsys.readouterr().err
    assert err.count("invalid JSON") == 20 and "... and 10 more (all in prepare_report.json)" in err


def test_bundled_data_is_valid_and_split_clean(tmp_path):
    root = Path(__file__).resolve().parents[1] / "data" / "aclsum"
    report = prepare(
        cfg(max_seq_length=512),
        [root / "train.jsonl"],
        tmp_path / "out",
        eval_inputs=[root / "eval.jsonl", root / "test.jsonl"],
    )
    assert report.invalid == report.duplicates == report.overlength_dropped == report.eval_leaks_removed == 0
    assert report.train_written >= 200 and report.eval_written >= 80


def test_a_lone_surrogate_is_reported_with_its_line_not_passed_to_the_tokenizer(tmp_path):
    """Found by tests/test_fuzz.py: valid JSON (a \\ud800 escape) that no tokenizer accepts."""
    raw = tmp_path / "raw.jsonl"
    raw.write_bytes(b"".join(jl(g) for g in GOOD) + b'{"instruction": "a\\ud800b", "output": "c"}\n')
    report = prepare(cfg(), [raw], tmp_path / "out")
    (problem,) = report.problems
    assert str(problem) == (
        f"{raw}:13: instruction: 'instruction' holds a lone surrogate (\\ud800), which is not text. "
        "Fix or remove that \\u escape: it is one half of a UTF-16 pair."
    )
    assert report.train_written == 12 and report.invalid == 1


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _prepared_once(tmp_path: Path) -> tuple[Path, Path, Path, dict[str, bytes]]:
    """A prepared output (train, eval, plot, report) and its bytes: what an interrupted re-run must keep."""
    raw, held_out = tmp_path / "r.jsonl", tmp_path / "e.jsonl"
    raw.write_text("".join(json.dumps(g) + "\n" for g in GOOD))
    held_out.write_text("".join(json.dumps(good(i)) + "\n" for i in range(50, 53)))
    out = tmp_path / "out"
    prepare(cfg(), [raw], out, eval_inputs=[held_out])
    return raw, held_out, out, _snapshot(out)


@pytest.mark.parametrize("stop_at", [1, 2, 3, 4])
def test_a_prepare_interrupted_mid_write_leaves_the_previous_output_as_it_was(tmp_path, monkeypatch, stop_at):
    """Stopped as each of its files is finished (train, eval, plot, report): the previous set stays whole,
    the new one's partial files go; nothing is mixed."""
    import os

    raw, held_out, out, before = _prepared_once(tmp_path)
    assert set(before) == set(OUTPUT_FILES)
    raw.write_text("".join(json.dumps(good(i)) + "\n" for i in range(100, 112)))  # different data
    calls, real_fsync = [], os.fsync

    def stops(fd):
        real_fsync(fd)
        calls.append(fd)
        if len(calls) == stop_at:
            raise KeyboardInterrupt  # as Ctrl-C would, with some files of the new set written

    monkeypatch.setattr(os, "fsync", stops)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg(), [raw], out, eval_inputs=[held_out], force=True)
    monkeypatch.undo()
    assert _snapshot(out) == before
    prepare(cfg(), [raw], out, eval_inputs=[held_out], force=True)
    assert _snapshot(out) != before and set(_snapshot(out)) == set(OUTPUT_FILES)


@pytest.mark.slow
def test_a_prepare_killed_mid_write_leaves_the_previous_output_under_its_names(tmp_path):
    import subprocess
    import sys

    raw, held_out, out, before = _prepared_once(tmp_path)
    raw.write_text("".join(json.dumps(good(i)) + "\n" for i in range(100, 112)))
    script = (
        "import os, signal, sys\n"
        "real = os.fsync\n"
        "def fsync(fd):\n"
        "    real(fd)\n"
        "    if 'token_lengths' in os.readlink(f'/proc/self/fd/{fd}'):\n"
        "        os.kill(os.getpid(), signal.SIGKILL)  # kill -9 with train and eval written\n"
        "os.fsync = fsync\n"
        "from qlora_llm.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    cmd = ["prepare", str(raw), "--eval-input", str(held_out), "--output-dir", str(out), "--model", TOKENIZER]
    cmd.append("--force")
    proc = subprocess.run([sys.executable, "-c", script, *cmd], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert {k: v for k, v in _snapshot(out).items() if not k.startswith(".")} == before


def test_preference_pairs_are_validated_line_by_line_and_counted(tmp_path):
    user, bot = "user", "assistant"

    def turn(role, text):
        return {"role": role, "content": text}

    lines = {
        1: {"prompt": "Summarize A.", "chosen": "A is short.", "rejected": "A is long and wrong."},
        2: {"prompt": "Summarize B.", "chosen": "Same.", "rejected": "Same."},
        3: {"prompt": "Summarize C.", "chosen": "", "rejected": "C."},
        4: {"chosen": [turn(user, "D?"), turn(bot, "D.")], "rejected": [turn(user, "E?"), turn(bot, "E.")]},
        5: {"chosen": [turn(bot, "F."), turn(user, "F?")], "rejected": [turn(bot, "G."), turn(user, "F?")]},
        6: {"instruction": "A supervised one.", "output": "Among pairs."},
        7: {"prompt": [turn("system", "Be brief."), turn(user, "H?")], "chosen": [turn(bot, "H.")],
            "rejected": [turn(bot, "Not H.")]},
        8: {"prompt": "Summarize " + "very " * 400 + "long.", "chosen": "Long.", "rejected": "Longer."},
        9: {"chosen": [turn(user, "I?"), turn(bot, "I.")], "rejected": [turn(user, "I?"), turn(bot, "J.")]},
    }  # fmt: skip
    raw = tmp_path / "pairs.jsonl"
    raw.write_text("".join(json.dumps(lines[i]) + "\n" for i in sorted(lines)))
    report = prepare(cfg(max_seq_length=256, min_examples=1), [raw], tmp_path / "out")
    found = {(p.line, p.kind) for p in report.problems}
    assert found == {
        (2, "identical_pair"),
        (3, "empty"),
        (4, "prompt_mismatch"),
        (5, "roles_order"),
        (6, "mixed_kinds"),
        (8, "overlength"),
    }, found
    written = read_jsonl(tmp_path / "out" / "train.jsonl")
    assert written == [
        {"messages": [{"role": "user", "content": "Summarize A."}], "chosen": "A is short.", "rejected": "A is long and wrong."},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "H?"}], "chosen": "H.", "rejected": "Not H."},
        {"messages": [{"role": "user", "content": "I?"}], "chosen": "I.", "rejected": "J."},
    ]  # fmt: skip
    assert report.records_read == len(written) + report.invalid + report.overlength_dropped == 9
    (problem,) = [p for p in report.problems if p.line == 4]
    assert str(problem) == (
        f"{raw}:4: rejected: 'chosen' and 'rejected' do not share the same turns before their last answer. "
        "A pair answers one prompt: only the final assistant turn may differ."
    )


def test_bundled_preference_pairs_are_valid_reproducible_and_held_out(tmp_path):
    """data/aclsum-pairs: valid pairs, rebuilt byte for byte from the kept base answers, on papers no
    other split uses."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    pairs = repo / "data" / "aclsum-pairs"
    report = prepare(
        cfg(max_seq_length=512), [pairs / "train.jsonl"], tmp_path / "out", eval_inputs=[pairs / "eval.jsonl"]
    )
    assert report.invalid == report.duplicates == report.overlength_dropped == report.eval_leaks_removed == 0
    assert report.train_written >= 100 and report.eval_written >= 25
    rebuilt = tmp_path / "rebuilt"
    rebuilt.mkdir()
    (rebuilt / "base_answers.jsonl").write_bytes((pairs / "base_answers.jsonl").read_bytes())
    done = subprocess.run(
        [sys.executable, str(repo / "data" / "make_aclsum_pairs.py"), "--out-dir", str(rebuilt)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    for name in ("train.jsonl", "eval.jsonl", "base_answers.jsonl"):
        assert (rebuilt / name).read_bytes() == (pairs / name).read_bytes(), name  # no model was run
    sft = {
        json.loads(x)["input"]
        for f in ("train", "eval", "test")
        for x in (repo / "data" / "aclsum" / f"{f}.jsonl").read_text().splitlines()
    }
    for name in ("train.jsonl", "eval.jsonl"):
        for line in (pairs / name).read_text().splitlines():
            assert json.loads(line)["prompt"].split("\n\n", 1)[1] not in sft  # a paper the SFT demo never saw


def test_token_ids_one_bos_and_completion_mask(mistral_tokenizer):
    records = [
        {"instruction": "Hi", "input": "", "output": "Hello there."},
        {"instruction": "A longer question here", "input": "with input", "output": "Ok."},
    ]
    rows, dropped = tokenize_examples(records, mistral_tokenizer, "mistral", 64)
    assert dropped == 0
    for row, record in zip(rows, records, strict=True):
        ids = row["input_ids"]
        assert ids[0] == 1 and ids.count(1) == 1 and ids[-1] == 2  # one BOS, ends on EOS
        answer = [i for i, m in zip(ids, row["completion_mask"], strict=True) if m]
        assert mistral_tokenizer.decode(answer) == f"{record['output']}</s>"


def test_collated_batch_labels_completion_and_eos_never_padding(
    tiny_mistral, tiny_data, tmp_path, monkeypatch
):
    """The first real batch the trainer feeds the model: which positions carry labels."""
    seen = {}

    class Spy:
        def train(self, *a, **k):
            seen["batch"] = next(iter(self.get_train_dataloader()))
            seen["pad"] = self.processing_class.pad_token_id
            return super().train(*a, **k)

    patch_trainer(monkeypatch, Spy)
    train(tiny_cfg(tiny_mistral, tiny_data, tmp_path / "run", *ONE_STEP, "train.group_by_length=false"))
    from qlora_llm.model import load_tokenizer

    batch, tok = seen["batch"], load_tokenizer(str(tiny_mistral))
    assert batch["input_ids"].shape[0] == 4
    for ids, labels, mask in zip(
        batch["input_ids"].tolist(), batch["labels"].tolist(), batch["attention_mask"].tolist(), strict=True
    ):
        n = sum(mask)
        assert ids[0] == 1 and ids[:n].count(1) == 1 and ids[n - 1] == 2
        learned = [t for t in labels if t != -100]
        text = tok.decode(learned)
        assert text.endswith("</s>") and labels[n - 1] == 2  # EOS is learned
        assert text.removesuffix("</s>").split()[0] in WORDS  # exactly the answer, no prompt token
        first = labels.index(learned[0])
        assert tok.decode(ids[:first]).endswith("[/INST]")
        assert all(x == -100 for x in labels[n:]) and all(x == seen["pad"] for x in ids[n:])


def test_pad_equal_to_eos_keeps_eos_label():
    """SmolLM2's pad token is its EOS: padding is masked by position, so the real EOS keeps its label."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    rows = [
        {"input_ids": [5, 6, 7, 2], "labels": [-100, 6, 7, 2]},
        {"input_ids": [5, 8, 2], "labels": [-100, 8, 2]},
    ]
    batch = DataCollatorForLanguageModeling(pad_token_id=2)(rows)
    assert batch["labels"].tolist() == [[-100, 6, 7, 2], [-100, 8, 2, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]


def test_overlong_examples_are_dropped_not_cut(mistral_tokenizer):
    rows, dropped = tokenize_examples(
        [{"instruction": "x " * 100, "input": "", "output": "y"}], mistral_tokenizer, "mistral", 32
    )
    assert rows == [] and dropped == 1

"""Generated inputs (hypothesis): `prepare` on any bytes, and any config file or override.

Invariants, whatever the bytes: no traceback (the CLI returns 0 or 1), no partial or temporary file, and
nothing lost silently: every record read is written or reported (in = out + reported). The example
budget is fixed and the search derandomized, so CI runs the same cases in bounded time.
"""

from __future__ import annotations

import csv
import io
import json
import math
import tempfile
from pathlib import Path

import pytest
import yaml
from conftest import MISTRAL_TOKENIZER, tiny_overrides
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qlora_llm.cli import main
from qlora_llm.config import ConfigError, describe_keys, load_config
from qlora_llm.data import OUTPUT_FILES, read_jsonl


def _config_keys() -> list[str]:
    return [key for key, _, _ in describe_keys()]


BUDGET = settings(
    max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)

text = st.text(st.characters(codec="utf-8"), max_size=40)  # lone surrogates are excluded by the codec
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=8,
)
good_record = st.fixed_dictionaries(
    {"instruction": text.filter(str.strip), "output": text.filter(str.strip)}, optional={"input": text}
)
record_like = st.dictionaries(
    st.sampled_from(["instruction", "input", "output", "prompt", "completion", "messages", "x"]),
    json_values,
    max_size=4,
)


def _line(kind: str, value) -> bytes:
    if kind == "bytes":
        return value.replace(b"\n", b" ")
    if kind == "surrogate":  # a JSON string escape that is a lone surrogate: valid JSON, invalid text
        return b'{"instruction": "a\\ud800b", "output": "c"}'
    if kind == "long":
        return json.dumps({"instruction": "x" * 200_000, "output": "y"}).encode()
    if kind == "nul":
        return b'{"instruction": "a\x00b", "output": "c"}'
    return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")


lines = st.lists(
    st.one_of(
        good_record.map(lambda r: ("json", r)),
        record_like.map(lambda r: ("json", r)),
        json_values.map(lambda v: ("json", v)),
        st.binary(max_size=60).map(lambda b: ("bytes", b)),
        st.sampled_from(["surrogate", "long", "nul"]).map(lambda k: (k, None)),
    ),
    max_size=12,
)


def _run(raw: Path, out: Path, *extra: str) -> int:
    code = main(
        ["prepare", str(raw), "--output-dir", str(out), "--model", str(MISTRAL_TOKENIZER), "--min-examples", "1", *extra]
    )  # fmt: skip
    return code


def _check_outcome(code: int, out: Path) -> None:
    assert code in (0, 1)
    left = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert not [name for name in left if name.startswith(".") or name.endswith(".tmp")], left
    if code == 1:
        assert "train.jsonl" not in left  # an error writes nothing
        return
    assert set(left) <= set(OUTPUT_FILES) and "train.jsonl" in left
    report = json.loads((out / "prepare_report.json").read_text())
    counts = report["counts"] if "counts" in report else report
    written = counts["train_written"] + counts["eval_written"]
    reported = (
        counts["invalid"] + counts["duplicates"] + counts["overlength_dropped"] + counts["eval_leaks_removed"]
    )
    assert counts["records_read"] == written + reported
    rows = read_jsonl(out / "train.jsonl")
    assert len(rows) == counts["train_written"] and all(isinstance(r, dict) for r in rows)


@BUDGET
@given(lines=lines, bom=st.booleans())
def test_prepare_on_generated_jsonl_ends_in_a_clear_error_or_a_valid_output(lines, bom):
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.jsonl"
        raw.write_bytes((b"\xef\xbb\xbf" if bom else b"") + b"\n".join(_line(k, v) for k, v in lines) + b"\n")
        _check_outcome(_run(raw, Path(tmp) / "out"), Path(tmp) / "out")


cells = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=30)


@BUDGET
@given(
    rows=st.lists(st.tuples(cells, cells), max_size=10),
    delimiter=st.sampled_from([",", ";", "\t", "|"]),
    quoting=st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL, csv.QUOTE_NONNUMERIC]),
    encoding=st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "latin-1"]),
)
def test_prepare_on_generated_csv_ends_in_a_clear_error_or_a_valid_output(rows, delimiter, quoting, encoding):
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=delimiter, quoting=quoting)
    writer.writerow(["instruction", "output"])
    writer.writerows(rows)
    data = buffer.getvalue().encode(encoding, errors="replace")
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / ("raw.tsv" if delimiter == "\t" else "raw.csv")
        raw.write_bytes(data)
        _check_outcome(_run(raw, Path(tmp) / "out"), Path(tmp) / "out")


# --------------------------------------------------------------------------------------------------
# Config files and overrides

yaml_words = st.sampled_from(
    [
        "true",
        "null",
        "~",
        "[]",
        "{}",
        "[1, 2]",
        "{a: 1}",
        "-0",
        "nan",
        ".nan",
        ".inf",
        "-.inf",
        "1e309",
        "0x10",
    ]
)
override_values = st.one_of(
    text.filter(lambda s: "\n" not in s),
    st.integers(-(10**12), 10**12).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    yaml_words,
)


CONFIG_BUDGET = settings(BUDGET, max_examples=300)  # no model: a few ms each


@CONFIG_BUDGET
@given(
    key=st.sampled_from(_config_keys()) | st.from_regex(r"\A[a-z]{1,6}\.[a-z_]{1,12}\Z"),
    value=override_values,
)
def test_any_override_is_taken_or_refused_naming_the_override(key, value):
    try:
        cfg = load_config(None, [f"{key}={value}"])
    except ConfigError as err:
        assert f"override '{key}={value}'" in str(err) or f"unknown key {key!r}" in str(err), str(err)
        return
    section, name = key.split(".")
    taken = getattr(getattr(cfg, section), name)
    assert not (isinstance(taken, float) and not math.isfinite(taken)), f"{key}={value} taken as {taken}"


@CONFIG_BUDGET
@given(
    tree=st.dictionaries(
        st.sampled_from(["model", "data", "lora", "train", "eval", "serve", "x"]),
        st.dictionaries(st.sampled_from([k.split(".")[1] for k in _config_keys()] + ["zz"]), json_values)
        | json_values,
        max_size=3,
    )
)
def test_any_config_file_is_taken_or_refused_naming_the_file(tree):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(yaml.safe_dump(tree), encoding="utf-8")
        try:
            load_config(path)
        except ConfigError as err:
            assert all(line.startswith(str(path)) for line in str(err).splitlines()), str(err)


@pytest.mark.parametrize(
    "override, code, message",
    [
        ("lora.r=0", 2, "override 'lora.r=0': lora.r: Input should be greater than 0 (got 0)"),
        ("train.learning_rate=-1e-4", 2, "train.learning_rate: Input should be greater than 0"),
        ("train.batch_size=1000000000", 1, "error: this run is estimated not to fit"),
        ("data.max_seq_length=10000000", 1, "data.max_seq_length=10000000 is beyond the context of"),
        ("train.batch_size=two", 2, "train.batch_size: Input should be a valid integer"),
        ("lora.rank=8", 2, "unknown key 'lora.rank'. Did you mean 'lora.r'?"),
        ("data.train_file=/nonexistent/qx.jsonl", 1, "/nonexistent/qx.jsonl: training data not found"),
        ("model.name=/nonexistent/qx-model", 1, "model '/nonexistent/qx-model' not found: not a folder"),
    ],
)
def test_absurd_settings_get_one_clear_message_before_any_model_loads(
    override, code, message, tiny_mistral, tiny_data, tmp_path, monkeypatch, capsys
):
    import qlora_llm.model as qmodel

    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded before the settings were checked")

    monkeypatch.setattr(qmodel, "load_base_model", loaded)
    args = tiny_overrides(tiny_mistral, tiny_data, tmp_path / "run", steps=2, batch=2, every=2)
    (tmp_path / "empty.yaml").write_text("{}\n")
    assert main(["train", str(tmp_path / "empty.yaml"), *args, override]) == code
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())

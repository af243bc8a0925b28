"""`prepare` on generated inputs (hypothesis): every run ends in a clear error or a valid output.

Invariants, whatever the bytes: no traceback (the CLI returns 0 or 1), no partial or temporary file, and
nothing lost silently: every record read is written or reported (in = out + reported). The example
budget is fixed and the search derandomized, so CI runs the same cases in bounded time.
"""

from __future__ import annotations

import csv
import io
import json
import tempfile
from pathlib import Path

from conftest import MISTRAL_TOKENIZER
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qlora_llm.cli import main
from qlora_llm.data import OUTPUT_FILES, read_jsonl

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

"""The data layer: raw CSV / JSONL / JSON / HF datasets -> validated, canonical training JSONL.

    report = prepare(cfg, ["raw.csv"], Path("data/out"), columns={"output": "answer"})

Reading keeps every record's file and 1-based line (CSV: the row's first line; datasets: the row
number), so each problem names file, line and field, with a hint on how to fix it. Records are
normalised to one canonical shape, so the same records give byte-identical output from any input kind:
- `{"instruction", "input", "output"}` for single-turn records (the seed's format; `{prompt,
  completion}` becomes instruction + output),
- `{"messages": [{"role", "content"}, ...]}` for conversations (system/user/assistant),
- `{"messages": [prompt turns], "chosen", "rejected"}` for preference pairs (DPO/ORPO); see
  `_normalize_pair` for the shapes read.
Lengths are counted with the model's real tokenizer on the rendered template, exactly as training
sees them. Outputs are written atomically: a failed run leaves no partial file behind.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import random
import re
import statistics
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

from qlora_llm.atomic import atomic_file_set
from qlora_llm.config import Config
from qlora_llm.errors import QloraError, TrainError
from qlora_llm.templates import ROLES, render, resolve_template

log = logging.getLogger(__name__)

OUTPUT_FILES = ("train.jsonl", "eval.jsonl", "prepare_report.json", "token_lengths.png")
FIELDS = ("instruction", "input", "output")
MAX_PROBLEMS_IN_REPORT = 10_000


class PrepareError(QloraError, RuntimeError):
    """Nothing (or too little) valid to write, or the overlength policy says stop; no output was written."""

    def __init__(self, message: str, report: PrepareReport | None = None):
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class Problem:
    file: str
    line: int
    field: str | None
    message: str
    hint: str = ""
    severity: Literal["error", "warning"] = "error"
    kind: str = "invalid"

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" + (f": {self.field}" if self.field else "")
        hint = f" {self.hint}" if self.hint else ""
        return f"{where}: {self.message}.{hint}"


@dataclass
class Record:
    file: str
    line: int
    data: dict[str, Any]
    """The canonical record (see the module docstring)."""


@dataclass
class PrepareReport:
    inputs: list[dict[str, Any]] = field(default_factory=list)
    records_read: int = 0
    train_written: int = 0
    eval_written: int = 0
    invalid: int = 0
    duplicates: int = 0
    overlength_dropped: int = 0
    truncated: int = 0
    eval_leaks_removed: int = 0
    problems: list[Problem] = field(default_factory=list)
    token_lengths: dict[str, float] = field(default_factory=dict)
    model: str = ""
    template: str = ""
    max_seq_length: int = 0
    overlength: str = ""
    example: dict[str, str] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)

    def flag(
        self,
        record: Record,
        kind: str,
        message: str,
        hint: str = "",
        severity: Literal["error", "warning"] = "error",
    ) -> None:
        """Note a problem with a whole record (no one field), at its file and line."""
        self.problems.append(Problem(record.file, record.line, None, message, hint, severity, kind))

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["problems"] = [asdict(p) for p in self.problems[:MAX_PROBLEMS_IN_REPORT]]
        d["problems_total"] = len(self.problems)
        d["problem_counts"] = dict(Counter(p.kind for p in self.problems))
        return d


# --------------------------------------------------------------------------------------------------
# Reading: every reader yields (line, object-or-None, problems) and never stops at the first bad record.


@dataclass
class _Raw:
    line: int
    obj: Any
    problem: Problem | None = None


_BOM = b"\xef\xbb\xbf"


def _unreadable(file: str, line: int, message: str, hint: str, kind: str) -> _Raw:
    """A record that could not be read at all (bad bytes, bad JSON, bad CSV row)."""
    return _Raw(line, None, Problem(file, line, None, message, hint, kind=kind))


def _decode_line(raw: bytes, file: str, line: int, offset: int) -> tuple[str | None, Problem | None]:
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as err:
        return None, Problem(
            file,
            line,
            None,
            f"invalid UTF-8 at byte {offset + err.start} (byte 0x{raw[err.start]:02x})",
            "Re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`).",
            kind="encoding",
        )


def _read_jsonl(path: Path, data: bytes) -> Iterator[_Raw]:
    name = str(path)
    offset = 0
    if data.startswith(_BOM):  # accepted: Windows editors write it
        offset = len(_BOM)
    lines = data[offset:].split(b"\n")
    for i, raw in enumerate(lines, start=1):
        start = offset
        offset += len(raw) + 1
        raw = raw.removesuffix(b"\r")  # CRLF accepted
        if not raw.strip():
            continue
        text, problem = _decode_line(raw, name, i, start)
        if problem:
            yield _Raw(i, None, problem)
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            yield _unreadable(
                name,
                i,
                f"invalid JSON at column {err.colno}: {err.msg}",
                "Each line must be one complete JSON object; check quotes, commas and escapes.",
                kind="json",
            )
            continue
        yield _Raw(i, obj)


def _invalid_utf8_offsets(data: bytes) -> list[int]:
    offsets, pos = [], 0
    while pos < len(data):
        try:
            data[pos:].decode("utf-8")
            break
        except UnicodeDecodeError as err:
            offsets.append(pos + err.start)
            pos += err.end
    return offsets


def _read_json_array(path: Path, data: bytes) -> Iterator[_Raw]:
    name = str(path)
    bad = _invalid_utf8_offsets(data)
    if bad:
        line = data[: bad[0]].count(b"\n") + 1
        yield _unreadable(
            name,
            line,
            f"invalid UTF-8 at byte {bad[0]} (byte 0x{data[bad[0]]:02x})",
            "Re-save the file as UTF-8; a JSON array cannot be read past a bad byte.",
            kind="encoding",
        )
        return
    text = data.decode("utf-8-sig").replace("\r\n", "\n")
    decoder = json.JSONDecoder()
    ws = re.compile(r"\s*")
    pos = ws.match(text, 0).end()
    line_at = _LineCounter(text)
    if not text.startswith("[", pos):
        yield _unreadable(
            name,
            line_at(pos),
            "expected a JSON array of objects or JSON Lines",
            "Write [{...}, {...}] or one object per line (.jsonl).",
            kind="json",
        )
        return
    pos = ws.match(text, pos + 1).end()
    if text.startswith("]", pos):
        return
    while True:
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            yield _unreadable(
                name,
                err.lineno,
                f"invalid JSON at column {err.colno}: {err.msg}",
                "Fix this element; a JSON array cannot be read past a syntax error.",
                kind="json",
            )
            return
        yield _Raw(line_at(pos), obj)
        pos = ws.match(text, end).end()
        if text.startswith(",", pos):
            pos = ws.match(text, pos + 1).end()
        elif text.startswith("]", pos):
            return
        else:
            line = line_at(pos)
            col = pos - text.rfind("\n", 0, pos)
            yield _unreadable(
                name,
                line,
                f"invalid JSON at column {col}: expected ',' or ']' between elements",
                "Separate array elements with commas.",
                kind="json",
            )
            return


class _LineCounter:
    """Line number of a character offset, counting forward only (offsets arrive in order)."""

    def __init__(self, text: str):
        self.text, self.pos, self.line = text, 0, 1

    def __call__(self, pos: int) -> int:
        self.line += self.text.count("\n", self.pos, pos)
        self.pos = pos
        return self.line


def _read_csv(path: Path, data: bytes, columns: dict[str, str], delimiter: str) -> Iterator[_Raw]:
    name = str(path)
    bad_offsets = _invalid_utf8_offsets(data)
    bad_lines = {data[:o].count(b"\n") + 1: o for o in reversed(bad_offsets)}
    # surrogateescape keeps the row structure around a bad byte, so the rest of the file still reads.
    text = data.decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    header = reader.fieldnames or []
    mapping = {f: columns.get(f, f) for f in ("instruction", "input", "output", "prompt", "completion")}
    missing = [c for f, c in columns.items() if c not in header]
    if missing:
        yield _Raw(
            1,
            None,
            Problem(
                name,
                1,
                missing[0],
                f"column '{missing[0]}' (mapped with --map) is not in the header",
                f"The header has: {', '.join(header)}.",
                kind="columns",
            ),
        )
        return
    if not any(mapping[f] in header for f in ("output", "completion")):
        yield _unreadable(
            name,
            1,
            "no output column: the header has " + ", ".join(header),
            "Name the columns instruction,input,output (or prompt,completion), or map yours: "
            "--map instruction=question --map output=answer.",
            kind="columns",
        )
        return
    last_line = 1
    for row in reader:
        line = last_line + 1
        last_line = reader.line_num
        if None in row:
            yield _unreadable(
                name,
                line,
                f"{len(header) + len(row[None])} cells, the header has {len(header)}",
                "Quote cells that contain the delimiter.",
                kind="csv",
            )
            continue
        hit = next((o for ln, o in bad_lines.items() if line <= ln <= last_line), None)
        if hit is not None:
            yield _unreadable(
                name,
                line,
                f"invalid UTF-8 at byte {hit} (byte 0x{data[hit]:02x})",
                "Re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`).",
                kind="encoding",
            )
            continue
        obj = {f: row[c] for f, c in mapping.items() if c in row}
        if "prompt" in obj and "instruction" not in obj:
            obj = {"prompt": obj.get("prompt"), "completion": obj.get("completion")}
        yield _Raw(line, obj)


def _read_dataset(source: str, split: str) -> Iterator[_Raw]:
    import datasets

    path = Path(source)
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        ds = datasets.load_from_disk(str(path))
    elif path.is_dir():
        ds = datasets.load_dataset(str(path), split=split)
    elif path.is_file():
        ds = datasets.load_dataset(path.suffix.lstrip("."), data_files=str(path), split="train")
    else:
        ds = _load_hub_dataset(source, split)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise PrepareError(f"{source}: no split '{split}'; it has {', '.join(ds)}. Pass --split NAME.")
        ds = ds[split]
    for i, row in enumerate(ds, start=1):
        yield _Raw(i, row)


def _load_hub_dataset(name: str, split: str) -> Any:
    import datasets

    from qlora_llm.model import _hub_reachable

    if not _hub_reachable():
        raise PrepareError(
            f"'{name}' is not a file or folder here, and the Hugging Face Hub cannot be reached from this "
            "machine (offline): on a machine with a network run "
            f"`datasets.load_dataset('{name}').save_to_disk('DIR')` and pass DIR."
        )
    try:
        return datasets.load_dataset(name, split=split)
    except Exception as err:  # datasets raises many types; the user needs the first line only
        raise PrepareError(f"{name}: could not load the dataset: {str(err).splitlines()[0]}") from None


def read_raw(
    source: str | Path, columns: dict[str, str] | None = None, split: str = "train"
) -> Iterator[_Raw]:
    """Yield every record of one input with its line, and a Problem for each unreadable one."""
    path = Path(source)
    if not path.exists():
        if re.fullmatch(r"[\w.-]+/[\w.-]+", str(source)) and not path.suffix:
            yield from _read_dataset(str(source), split)
            return
        raise PrepareError(f"{source}: file not found")
    if path.is_dir():
        yield from _read_dataset(str(path), split)
        return
    data = path.read_bytes()
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        yield from _read_csv(path, data, columns or {}, "\t" if suffix == ".tsv" else ",")
    elif suffix in (".parquet", ".arrow"):
        yield from _read_dataset(str(path), split)
    elif data.lstrip(_BOM).lstrip()[:1] == b"[":
        yield from _read_json_array(path, data)
    else:
        yield from _read_jsonl(path, data)


# --------------------------------------------------------------------------------------------------
# Validation and normalisation of one record.


def _clean(text: str) -> str:
    return text.replace("\r\n", "\n").strip()


def _text_field(
    obj: dict, key: str, file: str, line: int, required: bool, problems: list[Problem]
) -> str | None:
    value = obj.get(key)
    if value is None:
        if required:
            kind = "missing" if key not in obj else "empty"
            problems.append(
                Problem(
                    file,
                    line,
                    key,
                    f"'{key}' is {'missing' if key not in obj else 'null'}",
                    f"Every record needs a non-empty '{key}' string.",
                    kind=kind,
                )
            )
        return None if required else ""
    if not isinstance(value, str):
        problems.append(
            Problem(
                file,
                line,
                key,
                f"'{key}' must be a string, got {type(value).__name__} ({json.dumps(value)[:40]})",
                f'Quote it: "{key}": "{json.dumps(value)}".'
                if isinstance(value, int | float)
                else "Use a JSON string.",
                kind="type",
            )
        )
        return None
    surrogate = next((c for c in value if "\ud800" <= c <= "\udfff"), None)
    if surrogate is not None:  # valid JSON (a \u escape), but not text: no tokenizer can take it
        problems.append(
            Problem(
                file,
                line,
                key,
                f"'{key}' holds a lone surrogate (\\u{ord(surrogate):04x}), which is not text",
                "Fix or remove that \\u escape: it is one half of a UTF-16 pair.",
                kind="encoding",
            )
        )
        return None
    text = _clean(value)
    if required and not text:
        problems.append(
            Problem(
                file, line, key, f"'{key}' is empty", f"Give every record a non-empty '{key}'.", kind="empty"
            )
        )
        return None
    return text


def _normalize_messages(
    obj: dict, file: str, line: int, problems: list[Problem], key: str = "messages"
) -> dict | None:
    messages = obj[key]
    if not isinstance(messages, list) or not messages:
        problems.append(
            Problem(
                file,
                line,
                key,
                f"'{key}' must be a non-empty list",
                'Write "messages": [{"role": "user", "content": "..."}, ...].',
                kind="type",
            )
        )
        return None
    out, before = [], len(problems)
    for i, m in enumerate(messages):
        where = f"{key}[{i}]"
        if not isinstance(m, dict):
            problems.append(
                Problem(
                    file,
                    line,
                    where,
                    f"must be an object, got {type(m).__name__}",
                    'Write {"role": "user", "content": "..."}.',
                    kind="type",
                )
            )
            continue
        role = m.get("role")
        if not isinstance(role, str) or role.strip().lower() not in ROLES:
            problems.append(
                Problem(
                    file,
                    line,
                    f"{where}.role",
                    f"unknown role {role!r}",
                    "Use system, user or assistant.",
                    kind="role",
                )
            )
            continue
        content = _text_field(m, "content", file, line, True, problems)
        if content is None:
            problems[-1] = Problem(
                file,
                line,
                f"{where}.content",
                problems[-1].message,
                problems[-1].hint,
                kind=problems[-1].kind,
            )
            continue
        out.append({"role": role.strip().lower(), "content": content})
    if len(problems) > before:
        return None
    roles = [m["role"] for m in out]
    if "assistant" not in roles:
        problems.append(
            Problem(
                file,
                line,
                key,
                "conversation has no assistant turn",
                'Add the answer to learn as a final {"role": "assistant", ...} message.',
                kind="no_assistant",
            )
        )
        return None
    turns = roles[1:] if roles[0] == "system" else roles
    expected = ["user", "assistant"] * (len(turns) // 2 + 1)
    if turns != expected[: len(turns)] or turns[-1] != "assistant":
        problems.append(
            Problem(
                file,
                line,
                key,
                f"roles must be [system,] user, assistant, user, assistant, ...; got {', '.join(roles)}",
                "Alternate user and assistant, start with user (after an optional system) and end with the assistant "
                "answer to learn.",
                kind="roles_order",
            )
        )
        return None
    return {"messages": out}


def _normalize_pair(obj: dict, file: str, line: int, problems: list[Problem]) -> dict | None:
    """A preference pair -> {"messages": the prompt turns (ending with the user's), "chosen", "rejected"}.

    Three shapes: strings {"prompt", "chosen", "rejected"}; conversations {"chosen": [...], "rejected":
    [...]} that share every turn but the last (the answers); and {"prompt": [...], "chosen": [answer
    turn], "rejected": [answer turn]} (then indices in the messages count from the prompt's first turn).
    """
    if not isinstance(obj.get("chosen"), list) and not isinstance(obj.get("rejected"), list):
        prompt = _text_field(obj, "prompt", file, line, True, problems)
        chosen = _text_field(obj, "chosen", file, line, True, problems)
        rejected = _text_field(obj, "rejected", file, line, True, problems)
        if problems:
            return None
        messages = [{"role": "user", "content": prompt}]
    else:
        sides = {}
        for key in ("chosen", "rejected"):
            turns = obj.get(key)
            if isinstance(obj.get("prompt"), list) and isinstance(turns, list):
                turns = obj["prompt"] + turns
            conversation = _normalize_messages({key: turns}, file, line, problems, key=key)
            if conversation is not None:
                sides[key] = conversation["messages"]
        if problems:
            return None
        if sides["chosen"][:-1] != sides["rejected"][:-1]:
            problems.append(
                Problem(
                    file,
                    line,
                    "rejected",
                    "'chosen' and 'rejected' do not share the same turns before their last answer",
                    "A pair answers one prompt: only the final assistant turn may differ.",
                    kind="prompt_mismatch",
                )
            )
            return None
        messages = sides["chosen"][:-1]
        chosen, rejected = sides["chosen"][-1]["content"], sides["rejected"][-1]["content"]
    if chosen == rejected:
        problems.append(
            Problem(
                file,
                line,
                "rejected",
                "'chosen' and 'rejected' are the same answer",
                "A pair must prefer one answer over a different one; drop it or fix the rejected answer.",
                kind="identical_pair",
            )
        )
        return None
    return {"messages": messages, "chosen": chosen, "rejected": rejected}


def is_pair(record: dict) -> bool:
    """Whether a canonical record is a preference pair (else a supervised example)."""
    return "chosen" in record


def pair_examples(record: dict) -> tuple[dict, dict]:
    """A pair as two supervised examples (prompt + chosen, prompt + rejected), for the one template."""
    return tuple(  # type: ignore[return-value]
        {"messages": [*record["messages"], {"role": "assistant", "content": record[side]}]}
        for side in ("chosen", "rejected")
    )


def normalize(obj: Any, file: str, line: int) -> tuple[dict | None, list[Problem]]:
    """One raw record -> (canonical record or None, problems)."""
    problems: list[Problem] = []
    if not isinstance(obj, dict):
        problems.append(
            Problem(
                file,
                line,
                None,
                f"expected a JSON object, got {type(obj).__name__}",
                'Write {"instruction": ..., "input": ..., "output": ...}.',
                kind="type",
            )
        )
        return None, problems
    if "chosen" in obj or "rejected" in obj:
        return _normalize_pair(obj, file, line, problems), problems
    if "messages" in obj:
        return _normalize_messages(obj, file, line, problems), problems
    if "instruction" in obj or "output" in obj:
        instruction = _text_field(obj, "instruction", file, line, True, problems)
        text_input = _text_field(obj, "input", file, line, False, problems)
        output = _text_field(obj, "output", file, line, True, problems)
        if problems:
            return None, problems
        return {"instruction": instruction, "input": text_input, "output": output}, problems
    if "prompt" in obj or "completion" in obj:
        prompt = _text_field(obj, "prompt", file, line, True, problems)
        completion = _text_field(obj, "completion", file, line, True, problems)
        if problems:
            return None, problems
        return {"instruction": prompt, "input": "", "output": completion}, problems
    keys = ", ".join(sorted(obj)) or "none"
    problems.append(
        Problem(
            file,
            line,
            None,
            f"unknown record shape (keys: {keys})",
            "Use instruction/input/output, prompt/completion, messages, or prompt/chosen/rejected; for CSV columns "
            "with other names use --map output=COLUMN.",
            kind="shape",
        )
    )
    return None, problems


def _prompt_key(record: dict) -> str:
    """What the model is asked, whitespace- and case-folded: finds eval prompts that leaked into train."""
    if is_pair(record):
        asked = [m["content"] for m in record["messages"]]
    elif "messages" in record:
        asked = [m["content"] for m in record["messages"][:-1]]
    else:
        asked = [record["instruction"], record["input"]]
    return " ".join(" ".join(asked).split()).casefold()


def _dump(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False)


# --------------------------------------------------------------------------------------------------
# Token lengths, measured on the rendered template with the model's own tokenizer.


def _token_counts(tokenizer: Any, texts: list[str]) -> list[int]:
    """Token counts with special tokens, as training tokenizes them.

    The Rust tokenizer's encode_batch_fast skips offsets and transformers' per-text wrapping: about 25%
    faster on 100k records, same counts. Slow (Python) tokenizers take the ordinary path.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch_fast"):
        return [len(e.ids) for e in backend.encode_batch_fast(texts, add_special_tokens=True)]
    enc = tokenizer(texts, add_special_tokens=True, return_attention_mask=False)
    return [len(ids) for ids in enc["input_ids"]]


def _count_tokens(records: list[Record], tokenizer: Any, template: str, batch: int = 2048) -> list[int]:
    from tqdm.auto import tqdm

    lengths: list[int] = []
    for start in tqdm(
        range(0, len(records), batch),
        desc="counting tokens",
        unit="batch",
        disable=len(records) < 4 * batch or None,
    ):
        texts, owners = [], []
        for i, r in enumerate(records[start : start + batch]):
            for example in pair_examples(r.data) if is_pair(r.data) else (r.data,):
                rendered = render(example, template, tokenizer)
                texts.append(rendered.prompt + rendered.completion)
                owners.append(i)
        counts = [0] * len(records[start : start + batch])
        for i, n in zip(owners, _token_counts(tokenizer, texts), strict=True):
            counts[i] = max(counts[i], n)  # a pair is as long as its longer side
        lengths.extend(counts)
    return lengths


def _truncate(record: dict, tokenizer: Any, template: str, max_len: int) -> dict | None:
    """Shorten the longest prompt-side text so the example fits, keeping the answer and its EOS whole."""
    if is_pair(record):
        return None  # a pair is dropped, not cut: both sides must see the same prompt
    record = json.loads(json.dumps(record))
    if "messages" in record:
        candidates = [
            (i, "content") for i, m in enumerate(record["messages"][:-1]) if m["role"] != "assistant"
        ]
        get = lambda key: record["messages"][key[0]]["content"]  # noqa: E731

        def put(key, v):
            record["messages"][key[0]]["content"] = v
    else:
        candidates = [(None, "input"), (None, "instruction")]
        get = lambda key: record[key[1]]  # noqa: E731

        def put(key, v):
            record[key[1]] = v

    for _ in range(4):  # re-measure: cutting text can merge or split tokens at the boundary
        rendered = render(record, template, tokenizer)
        total = len(tokenizer(rendered.prompt + rendered.completion, add_special_tokens=True)["input_ids"])
        over = total - max_len
        if over <= 0:
            return record
        key = max(candidates, key=lambda k: len(get(k)))
        text = get(key)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        keep = len(enc["input_ids"]) - over - 1
        if keep <= 0:
            return None
        put(key, text[: enc["offset_mapping"][keep - 1][1]].rstrip())
    return None


def _length_stats(lengths: list[int]) -> dict[str, float]:
    if not lengths:
        return {}
    s = sorted(lengths)
    return {
        "min": s[0],
        "mean": round(statistics.fmean(s), 1),
        "p50": s[len(s) // 2],
        "p95": s[min(len(s) - 1, int(len(s) * 0.95))],
        "max": s[-1],
        "total": sum(s),
    }


def _plot_lengths(out: IO[bytes], train: list[int], eval_: list[int], max_len: int, model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=110)
    # One set of bin edges for both, so the two histograms can be compared bar for bar.
    edges = np.histogram_bin_edges(train + eval_, bins=min(60, max(10, len(set(train)) // 2)))
    ax.hist(train, bins=edges, color="#4C72B0", alpha=0.85, label=f"train ({len(train)})")
    if eval_:
        ax.hist(eval_, bins=edges, color="#DD8452", alpha=0.7, label=f"eval ({len(eval_)})")
    ax.axvline(max_len, color="#C44E52", linestyle="--", label=f"max_seq_length {max_len}")
    ax.set_xlabel(f"tokens per example ({model})")
    ax.set_ylabel("examples")
    ax.set_title("Token lengths of the prepared data")
    ax.legend(frameon=False)
    fig.tight_layout()
    fig.savefig(out, format="png")
    plt.close(fig)


# --------------------------------------------------------------------------------------------------


def held_out(n: int, fraction: float, seed: int) -> set[int]:
    """Indices of the seeded eval share of `n` examples: one split rule for `prepare` and `train`."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return set(order[: max(1, round(n * fraction))])


def _fingerprint(path: Path) -> dict[str, Any]:
    from qlora_llm.fingerprint import sha256_file

    if path.is_file():
        digest = sha256_file(path)
        return {"path": str(path), "sha256": digest, "bytes": path.stat().st_size}
    return {"path": str(path)}


def _read_all(
    inputs: Iterable[str | Path], columns: dict[str, str] | None, split: str, report: PrepareReport
) -> list[Record]:
    records: list[Record] = []
    for source in inputs:
        report.inputs.append(_fingerprint(Path(source)))
        for raw in read_raw(source, columns, split):
            report.records_read += 1
            if raw.problem:
                report.problems.append(raw.problem)
                report.invalid += 1
                continue
            data, problems = normalize(raw.obj, str(source), raw.line)
            report.problems.extend(problems)
            if data is None:
                report.invalid += 1
            else:
                records.append(Record(str(source), raw.line, data))
    return records


def _one_kind(
    train: list[Record], evals: list[Record], report: PrepareReport
) -> tuple[list[Record], list[Record]]:
    """One output holds supervised examples or preference pairs, not both: the first record decides."""
    if not train:
        return train, evals
    pairs = is_pair(train[0].data)
    kept: tuple[list[Record], list[Record]] = ([], [])
    for out, records in zip(kept, (train, evals), strict=True):
        for r in records:
            if is_pair(r.data) == pairs:
                out.append(r)
                continue
            report.invalid += 1
            first, this = (
                ("preference pair", "supervised example")
                if pairs
                else ("supervised example", "preference pair")
            )
            report.flag(
                r,
                "mixed_kinds",
                f"a {this} among {first}s (the first record, {train[0].file}:{train[0].line}, is a {first})",
                "Prepare supervised examples and preference pairs as separate datasets.",
            )
    return kept


def _drop_duplicates(records: list[Record], report: PrepareReport, label: str = "") -> list[Record]:
    seen: dict[str, Record] = {}
    kept = []
    for r in records:
        key = _dump(r.data)
        first = seen.get(key)
        if first is not None:
            report.duplicates += 1
            report.flag(
                r,
                "duplicate",
                f"duplicate of {first.file}:{first.line}{label}; dropped",
                "Duplicates over-weight one example; remove them or keep one.",
                severity="warning",
            )
            continue
        seen[key] = r
        kept.append(r)
    return kept


def prepare(
    cfg: Config,
    inputs: list[str | Path],
    output_dir: Path,
    *,
    eval_inputs: list[str | Path] | None = None,
    eval_fraction: float = 0.0,
    columns: dict[str, str] | None = None,
    split: str = "train",
    force: bool = False,
    strict: bool = False,
) -> PrepareReport:
    """Read, validate, format-check and write `train.jsonl` (+ `eval.jsonl`) and a report.

    `eval_fraction` > 0 holds out a seeded random share as `eval.jsonl`, unless `eval_inputs` give the
    eval set. Raises PrepareError,
    leaving no output file, when nothing valid remains, fewer than `cfg.data.min_examples` do, or the
    overlength policy is `error` and an example is too long (or `strict` and any record is invalid).
    """
    from qlora_llm.model import load_tokenizer

    output_dir = Path(output_dir)
    train_path = output_dir / "train.jsonl"
    if train_path.exists() and not force:
        raise PrepareError(f"{train_path} already exists; pass --force to overwrite it.")
    d, m = cfg.data, cfg.model
    report = PrepareReport(
        model=m.name, template=m.template, max_seq_length=d.max_seq_length, overlength=d.overlength
    )

    train = _drop_duplicates(_read_all(inputs, columns, split, report), report)
    evals = (
        _drop_duplicates(_read_all(eval_inputs, columns, split, report), report, " (eval)")
        if eval_inputs
        else []
    )
    train, evals = _one_kind(train, evals, report)

    if not train:
        raise PrepareError(
            f"no valid examples in {', '.join(map(str, inputs))} ({report.records_read} read, "
            f"{report.invalid} invalid); nothing written.",
            report,
        )
    if strict and report.errors:
        raise PrepareError(
            f"{len(report.errors)} invalid record(s) and --strict given; nothing written.", report
        )

    tokenizer = load_tokenizer(m.name, m.revision, m.cache_dir, m.trust_remote_code)
    m = m.model_copy(update={"template": resolve_template(m.template, tokenizer)})
    report.template = m.template
    first = pair_examples(train[0].data)[0] if is_pair(train[0].data) else train[0].data
    report.example = {k: v for k, v in asdict(render(first, m.template, tokenizer)).items()}
    report.example["text"] = render(first, m.template, tokenizer).text

    train, train_lengths = _fit_length(train, tokenizer, m.template, d, report)
    evals, eval_lengths = _fit_length(evals, tokenizer, m.template, d, report)
    if d.overlength == "error" and any(p.kind == "overlength" for p in report.problems):
        raise PrepareError(
            f"examples longer than max_seq_length {d.max_seq_length} and "
            "data.overlength=error; nothing written.",
            report,
        )
    if not eval_inputs and eval_fraction > 0 and len(train) > 1:
        held = held_out(len(train), eval_fraction, d.seed)
        evals = [r for i, r in enumerate(train) if i in held]
        eval_lengths = [n for i, n in enumerate(train_lengths) if i in held]
        train = [r for i, r in enumerate(train) if i not in held]
        train_lengths = [n for i, n in enumerate(train_lengths) if i not in held]
    evals, eval_lengths = _remove_eval_leaks(train, evals, eval_lengths, report)
    if len(train) < d.min_examples:
        raise PrepareError(
            f"only {len(train)} valid training example(s), fewer than data.min_examples={d.min_examples}; "
            "nothing written. Fix the reported records or add data.",
            report,
        )

    report.train_written, report.eval_written = len(train), len(evals)
    report.token_lengths = _length_stats(train_lengths)
    _write_prepared(output_dir, train, evals, (train_lengths, eval_lengths), report, d.max_seq_length, m.name)
    log.info("wrote %d train / %d eval examples to %s", len(train), len(evals), output_dir)
    return report


def _fit_length(
    records: list[Record], tokenizer: Any, template: str, d: Any, report: PrepareReport
) -> tuple[list[Record], list[int]]:
    """The records within data.max_seq_length and their lengths; the rest truncated, dropped or reported."""
    lengths = _count_tokens(records, tokenizer, template)
    kept, kept_lengths = [], []
    for r, n in zip(records, lengths, strict=True):
        if n <= d.max_seq_length:
            kept.append(r)
            kept_lengths.append(n)
            continue
        if d.overlength == "truncate":
            short = _truncate(r.data, tokenizer, template, d.max_seq_length)
            if short is not None:
                report.truncated += 1
                report.flag(
                    r,
                    "truncated",
                    f"{n} tokens > max_seq_length {d.max_seq_length}; prompt truncated",
                    severity="warning",
                )
                kept.append(Record(r.file, r.line, short))
                kept_lengths.append(_count_tokens([Record(r.file, r.line, short)], tokenizer, template)[0])
                continue
        severity = "error" if d.overlength == "error" else "warning"
        report.overlength_dropped += d.overlength != "error"
        report.flag(
            r,
            "overlength",
            f"{n} tokens > max_seq_length {d.max_seq_length}" + ("" if severity == "error" else "; dropped"),
            "Raise --max-seq-length, shorten the text, or use data.overlength=truncate.",
            severity=severity,
        )
    return kept, kept_lengths


def _remove_eval_leaks(
    train: list[Record], evals: list[Record], eval_lengths: list[int], report: PrepareReport
) -> tuple[list[Record], list[int]]:
    """An eval prompt the model trained on measures memory, not skill: take it out of eval."""
    train_prompts: dict[str, Record] = {}
    for r in train:
        train_prompts.setdefault(_prompt_key(r.data), r)
    clean_evals, clean_lengths = [], []
    for r, n in zip(evals, eval_lengths, strict=True):
        twin = train_prompts.get(_prompt_key(r.data))
        if twin is None:
            clean_evals.append(r)
            clean_lengths.append(n)
            continue
        report.eval_leaks_removed += 1
        report.flag(
            r,
            "eval_leak",
            f"eval example also in train ({twin.file}:{twin.line}); removed from eval",
            "Keep eval prompts out of the training data.",
            severity="warning",
        )
    return clean_evals, clean_lengths


def _write_prepared(
    output_dir: Path,
    train: list[Record],
    evals: list[Record],
    lengths: tuple[list[int], list[int]],
    report: PrepareReport,
    max_seq_length: int,
    model_name: str,
) -> None:
    """train.jsonl, eval.jsonl, the length histogram and the report, written as one set."""
    output_dir.mkdir(parents=True, exist_ok=True)
    train_path, eval_path = output_dir / "train.jsonl", output_dir / "eval.jsonl"
    png, report_path = output_dir / "token_lengths.png", output_dir / "prepare_report.json"
    report.outputs = [str(train_path), *([str(eval_path)] if evals else []), str(png), str(report_path)]
    # One set: an error or a kill before all four are written leaves the previous output as it was.
    with atomic_file_set(output_dir) as out:
        with out.open(train_path.name) as f:
            for r in train:
                f.write(_dump(r.data) + "\n")
        if evals:
            with out.open(eval_path.name) as f:
                for r in evals:
                    f.write(_dump(r.data) + "\n")
        else:
            out.remove(eval_path.name)  # a stale eval split from an earlier run would not match this train
        with out.open(png.name, "wb") as f:
            _plot_lengths(f, *lengths, max_seq_length, model_name)
        with out.open(report_path.name) as f:
            f.write(json.dumps(report.to_json(), indent=2, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    """Read a prepared (canonical) JSONL file."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# --------------------------------------------------------------------------------------------------
# Training examples: what train, plan, evaluate and merge read from prepared files


def load_examples(path: Path) -> list[dict]:
    """Canonical records from a JSONL/JSON/CSV file; any invalid record is an error pointing at `prepare`."""
    path = Path(path)
    if not path.is_file():
        raise TrainError(
            f"{path}: training data not found. Make it with `qlora-llm prepare RAW --output-dir DIR`."
        )
    records, problems = [], []
    try:
        for raw in read_raw(path):
            if raw.problem:
                problems.append(raw.problem)
                continue
            data, found = normalize(raw.obj, str(path), raw.line)
            problems.extend(found)
            if data is not None:
                records.append(data)
    except PrepareError as err:
        raise TrainError(str(err)) from None
    if problems:
        shown = "\n  ".join(str(p) for p in problems[:5])
        more = f"\n  ... and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise TrainError(
            f"{path} has {len(problems)} invalid record(s):\n  {shown}{more}\n"
            f"Clean it with `qlora-llm prepare {path} --output-dir DIR`."
        )
    return records


def split_examples(records: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """The seed's 90/10 split, seeded, keeping file order within each side."""
    if fraction <= 0 or len(records) < 2:
        return records, []
    held = held_out(len(records), fraction, seed)
    return [r for i, r in enumerate(records) if i not in held], [
        r for i, r in enumerate(records) if i in held
    ]


def tokenize_examples(
    records: list[dict], tokenizer: Any, template: str, max_length: int
) -> tuple[list[dict], int]:
    """Token ids and a completion mask per example, rendered by the one template.

    We tokenize here, not in TRL, so that training sees exactly the ids the template tests check: one
    BOS (added by the tokenizer, never as text), the completion ending in EOS. Examples longer than
    `max_length` are dropped, not cut: a cut example loses its EOS and teaches the model not to stop.
    """
    rows, dropped = [], 0
    for record in records:
        r = render(record, template, tokenizer)
        ids = tokenizer(r.prompt + r.completion, add_special_tokens=True)["input_ids"]
        prompt_ids = tokenizer(r.prompt, add_special_tokens=True)["input_ids"]
        n_prompt = 0
        while n_prompt < min(len(prompt_ids), len(ids)) and prompt_ids[n_prompt] == ids[n_prompt]:
            n_prompt += 1
        if len(ids) > max_length:
            dropped += 1
            continue
        rows.append({"input_ids": ids, "completion_mask": [0] * n_prompt + [1] * (len(ids) - n_prompt)})
    return rows, dropped


def tokenize_pairs(
    records: list[dict], tokenizer: Any, template: str, max_length: int
) -> tuple[list[dict], int]:
    """Preference pairs as TRL's DPO columns (prompt_ids, chosen_ids, rejected_ids), by the one template.

    The same ids `tokenize_examples` gives the pair's two sides: one BOS, each answer ending in EOS. A pair
    whose longer side is over `max_length` is dropped, not cut (both sides must keep their EOS).
    """
    rows, dropped = [], 0
    for record in records:
        sides = []
        for example in pair_examples(record):
            r = render(example, template, tokenizer)
            sides.append(tokenizer(r.prompt + r.completion, add_special_tokens=True)["input_ids"])
        prompt_ids = tokenizer(r.prompt, add_special_tokens=True)["input_ids"]
        n = 0  # the shared prefix: where the prompt ends in both tokenizations
        while n < min(len(prompt_ids), *map(len, sides)) and all(ids[n] == prompt_ids[n] for ids in sides):
            n += 1
        if max(map(len, sides)) > max_length:
            dropped += 1
            continue
        rows.append({"prompt_ids": sides[0][:n], "chosen_ids": sides[0][n:], "rejected_ids": sides[1][n:]})
    return rows, dropped

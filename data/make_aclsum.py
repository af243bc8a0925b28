"""Build the small ACLSum instruction-tuning dataset in data/aclsum/.

What it is
----------
A reproducible converter from the ``aclsum`` PyPI package (ACLSum: aspect-based
summarization of ACL papers, MIT license) to instruction-tuning records in the
seed format ``{"instruction": ..., "input": ..., "output": ...}``.

How to run (from the repository root, with the project virtualenv that has
``aclsum`` installed)::

    python data/make_aclsum.py            # e.g. .venv/bin/python data/make_aclsum.py

It writes ``data/aclsum/train.jsonl``, ``data/aclsum/eval.jsonl`` and
``data/aclsum/test.jsonl`` and prints the record counts. Only the standard
library is used: the package's data files are read directly (the package is
located with ``importlib.util.find_spec`` without importing it).

Source fields
-------------
* ``dataset/{train,val,test}.jsonl`` in the package: one paper per line with
  ``id`` (ACL Anthology id), ``title`` and ``summary`` -- one human-written
  reference summary per aspect: ``challenge``, ``approach``, ``outcome``.
* ``dataset/paper_jsons/<id>.json`` (S2ORC parse of the PDF): its ``abstract``
  field is the untokenized abstract text. (The split files also hold the
  abstract, but as tokenized sentences, e.g. "models ( LMs ) ." -- so the raw
  S2ORC text is used instead.) It is lightly cleaned of PDF-parse artifacts:
  footnotes that leaked in (text from a "*" or dagger footnote marker on, a
  footnote number after the final sentence as in "... models. 1", and
  "This work was done when ..." author notes) and a trailing fragment that
  does not end a sentence (body or table text that leaked into the abstract).

Record layout
-------------
* ``instruction``: a fixed per-aspect request, e.g. "Summarize the approach of
  this paper in one or two sentences."
* ``input``: ``"Title: <title>\\n\\nAbstract: <abstract>"`` with whitespace
  collapsed. To keep one example at roughly <= 300 tokens, the input is capped
  at MAX_INPUT_CHARS (1200) characters: the abstract is cut at the last
  sentence boundary that fits (or, if even the first sentence does not fit, at
  the last word boundary, followed by "...").
* ``output``: the human reference summary for that aspect (whitespace
  collapsed; otherwise unchanged).

Splits and selection (deterministic, no randomness)
---------------------------------------------------
Papers are sorted by ``id``; the package's own split is kept (train -> train,
val -> eval, test -> test).

* train: every paper x every aspect (challenge, approach, outcome), capped at
  MAX_TRAIN records (400) -- ACLSum has 100 train papers, so 300 records.
* eval: one record per validation paper (50 papers), the aspect rotating
  challenge/approach/outcome over the sorted papers.
* test: every second test paper in sorted order (50 of 100, spread over the
  whole id range), one record each, aspect rotating the same way.

Records with an empty input or output are skipped. Output files are UTF-8,
one ``json.dumps(rec, ensure_ascii=False)`` per line, "\\n" line endings, so
the same package version always yields the same bytes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
from pathlib import Path

ASPECTS = ("challenge", "approach", "outcome")
INSTRUCTIONS = {
    "challenge": (
        "Summarize the challenge (the problem or motivation) this paper addresses in one or two sentences."
    ),
    "approach": "Summarize the approach of this paper in one or two sentences.",
    "outcome": (
        "Summarize the outcome (the main findings or results) of this paper in one or two sentences."
    ),
}
MAX_INPUT_CHARS = 1200
MAX_TRAIN = 400
N_EVAL = 50
N_TEST = 50

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "data" / "aclsum"

# Sentence end: . ! ? (optionally followed by a closing quote/bracket), then
# whitespace, then something that starts a sentence.
_SENT_END = re.compile(r"(?<=[.!?])[\"')\]]?\s+(?=[A-Z0-9\"'(\[])")
# Abbreviations after which a period does not end a sentence.
_ABBREV = re.compile(
    r"(?:\be\.g|\bi\.e|\bet al|\bvs|\bcf|\bFig|\bFigs|\bEq|\bSec|\bNo|\bresp|\bapprox|\bviz)\.$",
    re.IGNORECASE,
)


def norm_ws(text: str) -> str:
    return " ".join(text.split())


def find_dataset_dir() -> Path:
    """Locate aclsum/dataset without importing aclsum (which needs sienna)."""
    spec = importlib.util.find_spec("aclsum")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            cand = Path(loc) / "dataset"
            if cand.is_dir():
                return cand
    # Fallback: the repository's own virtualenv.
    for cand in sorted(REPO_ROOT.glob(".venv/lib/python*/site-packages/aclsum/dataset")):
        if cand.is_dir():
            return cand
    sys.exit("error: aclsum package not found; pip install aclsum (or use .venv/bin/python)")


def split_sentences(text: str) -> list[str]:
    """Split on sentence ends, re-joining pieces that ended in an abbreviation."""
    pieces: list[str] = []
    start = 0
    for m in _SENT_END.finditer(text):
        end = m.start() + len(m.group(0).rstrip())  # keep closing quote/bracket
        piece = text[start:end].strip()
        start = m.end()
        if not piece:
            continue
        if pieces and _ABBREV.search(pieces[-1]):
            pieces[-1] = pieces[-1] + " " + piece
        else:
            pieces.append(piece)
    tail = text[start:].strip()
    if tail:
        if pieces and _ABBREV.search(pieces[-1]):
            pieces[-1] = pieces[-1] + " " + tail
        else:
            pieces.append(tail)
    return pieces


# A footnote marker ("*", dagger) after a sentence end, optionally preceded
# by a footnote number: everything from here on is footnote or table text.
_FOOTNOTE_START = re.compile(r"(?<=[.!?])\s+(?:\d{1,2}\s+)?[*\u2020\u2021]\s.*$")
_TRAILING_FOOTNOTE_NUM = re.compile(r"(?<=[.!?])\s+\d{1,2}$")
_AUTHOR_NOTE = re.compile(r"^This work (?:was|has been) done\b")
_COMPLETE = re.compile(r"[.!?][\"')\]]?$")


def clean_abstract(text: str) -> list[str]:
    """Abstract as a list of sentences, minus S2ORC parsing artifacts.

    Cuts the text at a footnote marker ("... system. * This work ..."),
    removes a footnote number after the last sentence ("... models. 1"),
    author notes ("This work was done when ..."), and a trailing fragment that
    does not end a sentence (text from the paper body or a table that leaked
    into the abstract).
    """
    text = _FOOTNOTE_START.sub("", norm_ws(text))
    text = _TRAILING_FOOTNOTE_NUM.sub("", text)
    sents = [x for x in split_sentences(text) if not _AUTHOR_NOTE.match(x)]
    if len(sents) > 1 and not _COMPLETE.search(sents[-1]):
        sents.pop()
    return sents


def truncate(sents: list[str], limit: int) -> str:
    """Longest prefix of whole sentences within `limit` characters."""
    out = ""
    for sent in sents:
        cand = f"{out} {sent}" if out else sent
        if len(cand) > limit:
            break
        out = cand
    if out or not sents:
        return out
    # Even the first sentence is too long: cut at a word boundary.
    cut = sents[0][: limit - 3]
    if " " in cut:
        cut = cut[: cut.rfind(" ")]
    return cut.rstrip(" ,;:") + "..."


def make_input(title: str, abstract: str) -> str:
    head = f"Title: {title}\n\nAbstract: "
    body = truncate(clean_abstract(abstract), MAX_INPUT_CHARS - len(head))
    return head + body if body else ""


def load_split(dataset_dir: Path, split: str) -> list[dict]:
    papers = []
    with open(dataset_dir / f"{split}.jsonl", encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            with open(dataset_dir / "paper_jsons" / f"{row['id']}.json", encoding="utf-8") as pf:
                abstract = norm_ws(json.load(pf).get("abstract") or "")
            papers.append(
                {
                    "id": row["id"],
                    "title": norm_ws(row["title"]),
                    "abstract": abstract,
                    "summary": {a: norm_ws(row["summary"].get(a) or "") for a in ASPECTS},
                }
            )
    papers.sort(key=lambda p: p["id"])
    return papers


def record(paper: dict, aspect: str) -> dict | None:
    inp = make_input(paper["title"], paper["abstract"]) if paper["abstract"] else ""
    out = paper["summary"][aspect]
    if not inp or not out:
        return None
    return {"instruction": INSTRUCTIONS[aspect], "input": inp, "output": out}


def all_aspects(papers: list[dict], cap: int) -> list[dict]:
    recs = [r for p in papers for a in ASPECTS if (r := record(p, a))]
    return recs[:cap]


def rotating(papers: list[dict], n: int, step: int = 1) -> list[dict]:
    """One record per selected paper, aspect cycling over the selection."""
    recs = []
    for j, paper in enumerate(papers[::step]):
        rec = record(paper, ASPECTS[j % len(ASPECTS)])
        if rec:
            recs.append(rec)
        if len(recs) >= n:
            break
    return recs


def write_jsonl(path: Path, recs: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for rec in recs:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--aclsum-dir",
        type=Path,
        default=None,
        help="the package's dataset/ folder (default: located automatically)",
    )
    ap.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)

    dataset_dir = args.aclsum_dir or find_dataset_dir()
    train_p = load_split(dataset_dir, "train")
    val_p = load_split(dataset_dir, "val")
    test_p = load_split(dataset_dir, "test")

    test_step = max(1, len(test_p) // N_TEST)
    splits = {
        "train": all_aspects(train_p, MAX_TRAIN),
        "eval": rotating(val_p, N_EVAL),
        "test": rotating(test_p, N_TEST, step=test_step),
    }
    for name, recs in splits.items():
        write_jsonl(args.out_dir / f"{name}.jsonl", recs)

    print(f"source: {dataset_dir}")
    print(f"papers: train={len(train_p)} val={len(val_p)} test={len(test_p)}")
    for name, recs in splits.items():
        print(f"{name}: {len(recs)} records -> {args.out_dir / (name + '.jsonl')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

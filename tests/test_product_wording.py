"""The product speaks of itself: README, docs, demo outputs, notebooks and the package's strings and comments say
what the software does, its results and its limits, never how it was developed (runs, sessions, targets, drafts,
issues). Each phrase below is one way development history leaks into a product file, with the reason it is
flagged; the patterns are narrow on purpose, so ordinary product text ("target" as a training setting, "the
previous version of the file" after a failed write, an "earlier run" a notebook left behind) passes."""

from __future__ import annotations

import html
import io
import json
import re
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (pattern, why a product file must not say it). Patterns are case-insensitive unless they start with (?-i).
PHRASES: list[tuple[str, str]] = [
    (r"\((?:run|session|attempt|try|take) [A-Z0-9]{1,3}\)",
     "a run label like '(run A)' or '(run 2)' names an experiment of the development, not a product setting"),
    (r"(?-i:\b[Rr]uns? [A-H](?: and [A-H])?\b(?![-'’]))",
     "'run A' / 'runs B and C' label development experiments"),
    (r"\bre-?run with the committed\b|\bas committed\b|\bthe committed (?:script|code|tool|version)s?\b",
     "'the committed script' / 'as committed' refer to the repository's history, not to what the product does"),
    (r"\b(?:under|below|above|over|within|beat|beats|met|meets|miss(?:es|ed)?|hit|hits|reach(?:es|ed)?) the\b"
     r"[^.\n]{0,40}%[^.\n]{0,15}\btarget\b|\d ?% target\b|\btarget of [<>~]?\d+(?:\.\d+)? ?%",
     "a percentage target is a development goal; the product states its measured results"),
    (r"\bfeasibility (?:run|study|test|check|experiment|pass)(?:es|s)?\b",
     "a feasibility run is how a choice was explored, not what the product does"),
    (r"\b(?:this|previous|earlier|the last) session(?:'s)?\b|\bsession \d+\b",
     "a development session (the work on the code) is not part of the product"),
    (r"\bas of (?:session|run|commit|iteration|this change)\b", "dates a statement by development history"),
    (r"\b(?:was|were|been) re-?run\b", "says a result was redone during development"),
    (r"\b(?:previous|earlier|older|old|first) (?:version|draft|iteration|revision) of (?:this|the|our) "
     r"(?:code|script|notebook|report|demo|test|package|module|tool|library|helpers|implementation|function)\b"
     r"|\b(?:than|from|since|versus|vs\.?) (?:the|a|an|our) (?:previous|earlier|older) (?:version|revision)\b",
     "compares with a previous version of the code; a product file describes the current one"),
    (r"\b(?:first|earlier|previous) draft\b", "a draft is a step of the development"),
    (r"\b(?:we|I) (?:first |then |also |originally |had |have )?tried\b", "'we tried' narrates the development"),
    (r"(?-i:\b(?:TODO|FIXME|XXX)\b)", "an open development note; say what the code does (or does not do) instead"),
    (r"\b(?:issue|bug|ticket|PR|pull request) ?#\d+|\b(?:fixes|fixed|closes|closed|see|per) #\d+\b",
     "points to the project's tracker, which a user of the product does not have"),
    (r"\bthis (?:PR|pull request|commit|branch|patch)\b", "speaks of a change to the code, not of the code"),
    (r"\b(?:after|before) the (?:fix|refactor|rewrite)\b", "narrates a change to the code"),
]
COMPILED = [(re.compile(p, re.IGNORECASE), why) for p, why in PHRASES]

_DATA_URI = re.compile(r"data:[\w/+.-]+;base64,[A-Za-z0-9+/=]+")
_JSON_VALUE = re.compile(r'^\s*(?:"(?:[^"\\]|\\.)*"\s*:\s*)?("(?:[^"\\]|\\.)*")\s*,?\s*$')
_BINARY_KEY = re.compile(r'^\s*"(?:image/[\w+.-]+|application/pdf)"\s*:')


def product_files() -> list[Path]:
    files = [ROOT / "README.md"]
    files += sorted(p for p in (ROOT / "docs").rglob("*") if p.suffix in (".html", ".md"))
    files += sorted(p for p in (ROOT / "demo_images").glob("*") if p.suffix in (".md", ".json"))
    files += sorted((ROOT / "notebooks").glob("*.ipynb"))
    files += sorted((ROOT / "helpers").rglob("*.py"))
    return [p for p in files if p.is_file()]


def _json_lines(text: str):
    """(line number, text) of a JSON file (a notebook too): each string value decoded, base64 images skipped.
    Notebooks keep one source or output line per JSON line, so the numbers are the file's own lines."""
    for n, line in enumerate(text.splitlines(), 1):
        if _BINARY_KEY.match(line):
            continue
        m = _JSON_VALUE.match(line)
        if m:
            try:
                line = json.loads(m.group(1))
            except ValueError:
                pass
        yield n, _DATA_URI.sub("", line)


def _python_lines(text: str):
    """(line number, text) of a module's strings (docstrings, messages, f-string text) and comments, line by line."""
    kinds = {tokenize.STRING, tokenize.COMMENT}
    kinds |= {getattr(tokenize, "FSTRING_MIDDLE")} if hasattr(tokenize, "FSTRING_MIDDLE") else set()
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type in kinds:
            for k, line in enumerate(tok.string.splitlines()):
                yield tok.start[0] + k, line


def _lines(path: Path):
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".py":
        yield from _python_lines(text)
    elif path.suffix in (".json", ".ipynb"):
        yield from _json_lines(text)
    elif path.suffix == ".html":
        for n, line in enumerate(text.splitlines(), 1):
            yield n, html.unescape(_DATA_URI.sub("", line))
    else:
        for n, line in enumerate(text.splitlines(), 1):
            yield n, line


def find_history_wording(files=None) -> list[str]:
    """'path:line: "phrase" (reason)' for every development-history phrase in the product files."""
    hits = []
    for path in files if files is not None else product_files():
        rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        for n, line in _lines(path):
            spans: list[tuple[int, int]] = []
            for rx, why in COMPILED:
                for m in rx.finditer(line):
                    if any(m.start() < end and start < m.end() for start, end in spans):
                        continue  # the same words, already caught by an earlier pattern
                    spans.append(m.span())
                    hits.append(f"{rel}:{n}: {m.group(0)!r} ({why})")
    return hits


def test_product_files_do_not_describe_how_they_were_developed():
    hits = find_history_wording()
    assert not hits, ("product files describe how the product was developed, not the product; reword these:\n  "
                      + "\n  ".join(hits))


def test_the_phrases_catch_history_and_pass_product_text(tmp_path):
    history = [
        "LoRA reaches 84% (run A) and 90% (run 2).",
        "numbers re-run with the committed script",
        "the KID is under the 5 % target",
        "# 1.8x faster than in both blocks (feasibility run)",
        "plus this session's TI runs",
        "the table was re-run after the change",
        "slower than the previous version of the demo",
        "context and ln: its first draft",
        "we tried a larger rank first",
        "# TODO: SDXL",
        "works around issue #12",
        "as of session 4 the demo uses DDIM",
    ]
    product = [
        'LoRA(target="full") trains attention and MLP layers; --target full',
        "The previous version of the file, if any, is intact.",
        "removing LoRA layers left on the base model by an earlier run or load_loras()",
        "run a notebook top to bottom; Run A1111 with the LoRA",
        "the second runs the tests; a run Colab cut off continues with RESUME = True",
        "feasibility of training on a T4: 16 GB is enough for SD 1.5 at batch 1",
        "the onnxruntime session runs on the CPU; todo = [] lists the images left",
        "the target modules of the text encoder; the noise target is v or epsilon",
        "group #3 of near duplicates",
    ]
    src = tmp_path / "sample.md"
    src.write_text("\n".join(history + product) + "\n", encoding="utf-8")
    hits = find_history_wording([src])
    flagged = sorted({int(h.split(":")[1]) for h in hits})
    assert flagged == list(range(1, len(history) + 1)), "\n".join(hits)
    assert hits[0].startswith(f"{src}:1: '(run A)' (")  # path:line: phrase (reason)


def test_notebook_and_python_lines_are_the_files_own_lines(tmp_path):
    nb = {"cells": [{"cell_type": "markdown", "metadata": {}, "source": ["# Train\n", "done (run B)\n"]},
                    {"cell_type": "code", "execution_count": 1, "metadata": {}, "source": ["print(1)"],
                     "outputs": [{"output_type": "display_data", "metadata": {},
                                  "data": {"image/png": "iVBOR+TODO+AAA", "text/plain": ["as of session 3"]}}]}],
          "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    path = tmp_path / "x.ipynb"
    path.write_text(json.dumps(nb, indent=1), encoding="utf-8")
    lines = path.read_text().splitlines()
    hits = find_history_wording([path])
    where = [next(i for i, s in enumerate(lines, 1) if words in s) for words in ("run B", "session 3")]
    assert [int(h.split(":")[1]) for h in hits] == where  # the base64 "TODO" of the image is not read
    mod = tmp_path / "m.py"
    mod.write_text('"""A module.\n\nIt was re-run."""\nx = 1  # TODO later\ny = f"{x} (run 2)"\ntodo = 1\n')
    assert [int(h.split(":")[1]) for h in find_history_wording([mod])] == [3, 4, 5]

"""Datasets as lists of frozen `Example` records read from local files (JSONL and parquet directly; CSV, arrow and
`datasets` save_to_disk directories through the optional `datasets` package, offline), a deterministic
train/validation split, and `PromptStream`, the endless resumable batch iterator that feeds GRPO prompts. A bad
row stops with `DataError` naming the file, the line and the field."""
from __future__ import annotations

import itertools
import json
import math
import os
import random
import re
from dataclasses import dataclass, field, replace

from .hfdata import HF_FORMATS, hf_rows

FIELDS = ("id", "question", "answer", "solution", "prompt")  # our names; `fields=` maps them to columns
_REQUIRED = ("question", "answer")

# JSON escapes that ate the backslash of a LaTeX command ("\f" is a form feed, "\t" a tab, "\b" a
# backspace). Only commands whose remaining letters cannot follow a real tab or form feed are listed:
# DAPO-Math-17k also holds genuine tabs (Asymptote code) and PDF ligature bytes, which are left alone.
LATEX_ESCAPE_REPAIRS = (
    ("\x0crac", "\\frac"),
    ("\triangle", "\\triangle"),
    ("\times", "\\times"),
    ("\theta", "\\theta"),
    ("\text{", "\\text{"),
    ("\x08eta", "\\beta"),
)


class DataError(ValueError):
    """A malformed row; the message reads `path:line: reason` (`path:row N: reason` for parquet)."""


@dataclass(frozen=True)
class Example:
    """One problem. `prompt`: a prompt text as the file gives it, or the list of {role, content} messages of a
    conversational row (TRL's form: it is the prompt, and `question` is its last user message). `meta` holds the
    file's other columns (e.g. difficulty, level, subject)."""

    id: str
    question: str
    answer: str
    solution: str | None = None
    prompt: str | list | None = None
    meta: dict = field(default_factory=dict)

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)


@dataclass(frozen=True)
class Patterns:
    """Regexes whose first group is the field's value, searched in the column's text (data.answer_pattern,
    data.question_pattern); None: the column as it is."""
    answer: str | None = None
    question: str | None = None


def compile_pattern(pattern: str, name: str) -> re.Pattern:
    """`pattern` compiled; ValueError when it does not compile or has no group to take the value from."""
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{name} {pattern!r} is not a valid regular expression ({e})") from None
    if regex.groups < 1:
        raise ValueError(f"{name} {pattern!r} has no group; put the part to keep in parentheses, e.g. '####\\s*(.+)'")
    return regex


def load_examples(path: str, fields: dict | None = None, limit: int | None = None,
                  repair_latex_escapes: bool = False, patterns: Patterns | None = None) -> list[Example]:
    """Read examples from `.jsonl`/`.json` (one JSON object per line), `.parquet`, or through `datasets`
    (`.csv`, `.arrow`, a save_to_disk directory; see read_rows).

    fields: our name -> the file's column, e.g. {"question": "problem", "answer": "ground_truth"};
        unmapped names use our own; a dotted column reads a nested value ("reward_model.ground_truth") or a
        list item ("prompt.0.content").
    limit: keep the first `limit` rows. `id` falls back to the 0-based row number.
    repair_latex_escapes: undo the JSON-escaping bug of DAPO-Math-17k and AIME25, where "\\frac" was
        written as a form feed + "rac" (see LATEX_ESCAPE_REPAIRS); off by default, the data stay verbatim.
    patterns: take the answer / question out of their columns' text (Patterns), e.g. GSM8K's "#### 72".
    """
    columns, regexes = _column_map(fields), _regexes(patterns)
    examples = []
    for where, row in read_rows(path, limit):
        if limit is not None and len(examples) >= limit:
            break
        ex = _to_example(row, columns, len(examples), f"{path}:{where}", regexes)
        examples.append(_repair(ex) if repair_latex_escapes else ex)
    return examples


def check_file(path: str, fields: dict | None = None, rows: int = 100, need_solution: bool = False,
               patterns: Patterns | None = None) -> None:
    """Read the first `rows` rows of a data file as `load_examples` does (encoding, JSON, fields, types, message
    lists, patterns) and check that every column `fields` names appears in them; DataError / FileNotFoundError /
    ValueError naming the file (and line) otherwise. Cheap: what a run checks before any work. Returns how many
    of those rows are conversational (their prompt a list of messages)."""
    columns, regexes = _column_map(fields), _regexes(patterns)
    count, seen, chats = 0, set(), 0
    for where, row in itertools.islice(read_rows(path, rows), rows):
        ex = _to_example(row, columns, count, f"{path}:{where}", regexes)
        chats += ex.conversational
        if need_solution and not ex.solution:
            raise DataError(f"{path}:{where}: no solution (field 'solution', column {columns['solution']!r}); "
                            "SFT needs one in every row")
        count += 1
        seen |= {name for name, col in columns.items() if _lookup(row, col) is not _ABSENT}
    if not count:
        raise DataError(f"{path}: no rows; the file is empty")
    for name, column in (fields or {}).items():
        if name not in seen and column is not None:
            raise DataError(f"{path}: fields maps {name!r} to column {column!r}, which none of the first "
                            f"{count} rows holds")
    return chats


def read_rows(path: str, limit: int | None = None):
    """(where, dict) per row: `where` is the line of a JSONL file, "row i" otherwise. JSONL and parquet are read
    directly; .csv, .arrow and a directory written by save_to_disk go through `datasets` (hf_rows)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such data file; check the path in the config (data dir: "
                                f"{os.path.abspath(os.path.dirname(path) or '.')})")
    ext = os.path.splitext(path)[1].lower()
    if ext in (".jsonl", ".json"):
        return _jsonl_rows(path)
    if ext == ".parquet":
        return _parquet_rows(path, limit)
    if os.path.isdir(path) or ext in HF_FORMATS:
        return hf_rows(path, limit)
    raise ValueError(f"{path}: unknown data format {ext!r}; use .jsonl, .json (JSON lines), .parquet, "
                     f"{', '.join(HF_FORMATS)} or a `datasets` directory (save_to_disk)")


def _column_map(fields: dict | None) -> dict:
    """our name -> column; an optional field mapped to None (YAML null) is not read (e.g. prompt: null keeps a
    conversational `prompt` column from being used as the prompt)."""
    unknown = set(fields or {}) - set(FIELDS)
    if unknown:
        raise ValueError(f"fields: unknown name(s) {sorted(unknown)}; the names to map are {list(FIELDS)}")
    for name, column in (fields or {}).items():
        if not (isinstance(column, str) and column) and (column is not None or name in _REQUIRED):
            raise ValueError(f"fields.{name}: {column!r}; give a column name" +
                             ("" if name in _REQUIRED else " (or null to read no column)"))
    return {name: (fields or {}).get(name, name) for name in FIELDS}


def _jsonl_rows(path: str):
    """Yield (1-based line number, dict) for each non-blank line."""
    with open(path, "rb") as f:  # bytes, decoded line by line: a bad byte is reported with its line
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                                f"{e.start + 1}); convert the file to UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}); "
                                "each line must hold one JSON object") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__} "
                                "(.json files are read as JSON lines: one object per line)")
            yield lineno, row


def _parquet_rows(path: str, limit: int | None):
    """Yield ("row i", dict) with i the 0-based row index."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    table = pq.read_table(path)
    if limit is not None:
        table = table.slice(0, limit)
    for i, row in enumerate(table.to_pylist()):
        yield f"row {i}", row


_ABSENT = object()  # a column the row does not have (None is a column holding null)


def _lookup(row: dict, column: str | None):
    """row[column], or for a dotted column name a nested value or list item ("prompt.0.content"); _ABSENT when
    there is none (or the field is mapped to no column: None)."""
    if column is None:
        return _ABSENT
    if column in row:
        return row[column]
    value = row
    for part in column.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return _ABSENT
    return value


def _as_text(value, name: str, column: str, where: str) -> str | None:
    """Strings pass, integers and whole floats become strings (27.0 -> "27"), null and absent give None;
    NaN, infinities and fractional floats stop (a JSON float is not the answer as written)."""
    if value is None or value is _ABSENT or isinstance(value, str):
        return None if value is _ABSENT else value
    if isinstance(value, float) and not math.isfinite(value):
        raise DataError(f"{where}: field {name!r} (column {column!r}) is {value}; give a real value")
    if isinstance(value, float) and not value.is_integer():
        raise DataError(f"{where}: field {name!r} (column {column!r}) is the float {value!r}; write it as a "
                        f"string (\"{value!r}\") so it is used exactly as written")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(int(value))
    raise DataError(f"{where}: field {name!r} (column {column!r}) must be a string or a number, "
                    f"got {type(value).__name__}; map another column with fields={{{name!r}: ...}}")


def _messages(value: list, column: str, where: str) -> list[dict]:
    """A conversational prompt (TRL's form): a non-empty list of {"role": str, "content": str}."""
    if not value:
        raise DataError(f"{where}: field 'prompt' (column {column!r}) is an empty list; a conversational prompt is "
                        "a list of {role, content} messages")
    for i, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise DataError(f"{where}: field 'prompt' (column {column!r}) message {i} is {str(m)[:80]}; each message "
                            "must be {'role': <text>, 'content': <text>}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _extract(regex: re.Pattern, text: str, name: str, column: str, where: str) -> str:
    match = regex.search(text)
    if match is None or match.group(1) is None or not match.group(1).strip():
        raise DataError(f"{where}: data.{name}_pattern {regex.pattern!r} does not match field {name!r} (column "
                        f"{column!r}): {text[-120:]!r}")
    return match.group(1).strip()


def _regexes(patterns: Patterns | None) -> dict:
    patterns = patterns or Patterns()
    return {name: compile_pattern(p, f"data.{name}_pattern")
            for name, p in (("answer", patterns.answer), ("question", patterns.question)) if p is not None}


def _to_example(row: dict, columns: dict, index: int, where: str, regexes: dict | None = None) -> Example:
    found = {name: _lookup(row, col) for name, col in columns.items()}
    messages = _messages(found.pop("prompt"), columns["prompt"], where) if isinstance(found["prompt"], list) else None
    if messages is not None and found["question"] in (None, _ABSENT):  # the question is the last user message
        found["question"] = next((m["content"] for m in reversed(messages) if m["role"] == "user"),
                                 messages[-1]["content"])
    values = {name: _as_text(v, name, columns[name], where) for name, v in found.items()}
    for name in _REQUIRED:
        if found[name] is None:
            raise DataError(f"{where}: field {name!r} (column {columns[name]!r}) is null; every row needs one")
        if found[name] is _ABSENT:
            raise DataError(f"{where}: missing field {name!r} (column {columns[name]!r}); the row has "
                            f"columns {sorted(row)}; map the right one with fields={{{name!r}: ...}}")
        if not values[name].strip():
            raise DataError(f"{where}: empty field {name!r} (column {columns[name]!r})")
        if name in (regexes or {}):
            values[name] = _extract(regexes[name], values[name], name, columns[name], where)
    used = {col for col in columns.values()}
    meta = {k: v for k, v in row.items() if k not in used}
    return Example(id=values["id"] if values["id"] is not None else str(index), question=values["question"],
                   answer=values["answer"].strip(), solution=values["solution"],
                   prompt=messages if messages is not None else values["prompt"], meta=meta)


def repair_latex(text: str) -> str:
    """Undo the known JSON-escape damage of LaTeX commands (LATEX_ESCAPE_REPAIRS)."""
    for broken, fixed in LATEX_ESCAPE_REPAIRS:
        text = text.replace(broken, fixed)
    return text


def _repair(ex: Example) -> Example:
    texts = {"question": ex.question, "solution": ex.solution, "prompt": ex.prompt}
    fixed = {k: repair_latex(v) for k, v in texts.items() if isinstance(v, str)}
    if ex.conversational:
        fixed["prompt"] = [{**m, "content": repair_latex(m["content"])} for m in ex.prompt]
    return replace(ex, **fixed)


def write_jsonl(examples, path: str) -> None:
    """Write examples as JSON lines that `load_examples` reads back; `meta` keys become columns."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for ex in examples:
            clash = set(ex.meta) & set(FIELDS)
            if clash:
                raise ValueError(f"example {ex.id}: meta keys {sorted(clash)} clash with the fields {FIELDS}")
            row = {"id": ex.id, "question": ex.question, "answer": ex.answer}
            row.update({k: v for k, v in (("solution", ex.solution), ("prompt", ex.prompt)) if v is not None})
            row.update(ex.meta)
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def split_examples(examples: list, val_size: int | float, seed: int) -> tuple[list, list]:
    """Deterministic split into (train, val); both keep the input order.

    val_size: a count (int, 0..len) or a fraction (float in (0, 1), rounded to a count).
    """
    n = len(examples)
    if isinstance(val_size, float):
        if not 0.0 < val_size < 1.0:
            raise ValueError(f"val_size={val_size}: a fraction must lie in (0, 1); pass an int for a count")
        k = round(n * val_size)
    elif isinstance(val_size, int) and 0 <= val_size <= n:
        k = val_size
    else:
        raise ValueError(f"val_size={val_size!r}: expected an int in [0, {n}] or a float in (0, 1)")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    val_idx = set(order[:k])
    train = [ex for i, ex in enumerate(examples) if i not in val_idx]
    val = [ex for i, ex in enumerate(examples) if i in val_idx]
    return train, val


class PromptStream:
    """Endless batches of examples: each epoch is a fresh shuffle (epoch e uses seed + e), and a batch
    that crosses an epoch end continues into the next epoch. `state_dict()` / `load_state_dict()`
    resume it exactly: the resumed stream yields what the original would have."""

    def __init__(self, examples: list, seed: int = 0):
        if not examples:
            raise ValueError("PromptStream: no examples; check the data path and `limit`")
        self.examples = list(examples)
        self.seed = seed
        self.epoch = 0
        self.position = 0  # index into this epoch's order of the next example to yield
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.examples)))
        random.Random(self.seed + epoch).shuffle(order)
        return order

    def next_batch(self, n: int) -> list[Example]:
        if n < 1:
            raise ValueError(f"next_batch(n={n}): n must be >= 1")
        batch = []
        while len(batch) < n:
            if self.position == len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._epoch_order(self.epoch)
            take = self._order[self.position:self.position + n - len(batch)]
            batch += [self.examples[i] for i in take]
            self.position += len(take)
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_examples": len(self.examples)}

    def load_state_dict(self, state: dict) -> None:
        for key, mine in (("seed", self.seed), ("num_examples", len(self.examples))):
            if key in state and state[key] != mine:
                raise DataError(f"the checkpoint's data position was saved with {key}={state[key]}, but the data "
                                f"now have {key}={mine}: the data changed since; resume with the same data and "
                                "seed, or start over (checkpoint.resume: never)")
        if not 0 <= state["position"] <= len(self.examples):
            raise ValueError(f"PromptStream.load_state_dict: position {state['position']} is outside "
                             f"0..{len(self.examples)}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._epoch_order(self.epoch)

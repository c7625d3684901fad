"""Format checks and statistics of parallel-thinking blocks, on text or on token ids.

Implements DESIGN.md "rewards/": `parallel_stats` / `ParallelStats` (plus the same on ids and
the path-agreement metric).
"""
import re
from dataclasses import dataclass
from fractions import Fraction

TAGS = ("<Parallel>", "</Parallel>", "<Path>", "</Path>", "<Summary>", "</Summary>")
PARALLEL_OPEN, PARALLEL_CLOSE, PATH_OPEN, PATH_CLOSE, SUMMARY_OPEN, SUMMARY_CLOSE = range(6)
_TAG = re.compile("|".join(re.escape(tag) for tag in TAGS))
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


@dataclass(frozen=True)
class ParallelStats:
    """What the tags of one response say; `reasons` explains `well_formed` == False."""
    num_blocks: int                     # closed blocks with >= 2 paths ("valid blocks")
    paths_per_block: list[int]          # paths opened in every block opened, in order
    well_formed: bool
    first_block_position: float | None  # offset of the first <Parallel> / length, 0..1
    num_summaries: int                  # closed <Summary>...</Summary> pairs
    has_summary_after_each_block: bool  # every </Parallel> followed (blanks only) by <Summary>
    reasons: tuple[str, ...] = ()
    # Per block, the (start, end) of each closed path's content (offsets in the text or ids).
    path_spans: tuple[tuple[tuple[int, int], ...], ...] = ()


class _TagScan:
    """The state machine behind parallel_stats: feed tags in order, then `finish`."""

    def __init__(self, gap_is_blank):
        self.gap_is_blank = gap_is_blank  # (start, end) -> bool: only whitespace in between?
        self.state = "outside"  # outside | block | path | summary | after_block
        self.reasons: list[str] = []
        self.paths_per_block: list[int] = []
        self.spans: list[list[tuple[int, int]]] = []
        self.first_open: int | None = None
        self.num_blocks = self.num_summaries = self.summarised_blocks = self.closed_blocks = 0
        self.mark = 0  # end of the last tag that matters for the next one

    def flag(self, reason: str) -> None:
        if reason not in self.reasons:
            self.reasons.append(reason)

    def feed(self, tag: int, start: int, end: int) -> None:
        if self.state == "after_block" and tag != SUMMARY_OPEN:
            self.flag("missing <Summary> after </Parallel>")
            self.state = "outside"
        handler = (self._parallel_open, self._parallel_close, self._path_open,
                   self._path_close, self._summary_open, self._summary_close)[tag]
        handler(start, end)

    def _parallel_open(self, start: int, end: int) -> None:
        if self.state in ("block", "path"):
            self.flag("nested <Parallel>")
            return
        if self.state == "summary":
            self.flag("<Parallel> inside <Summary>")
        if self.first_open is None:
            self.first_open = start
        self.paths_per_block.append(0)
        self.spans.append([])
        self.state = "block"

    def _parallel_close(self, start: int, end: int) -> None:
        if self.state not in ("block", "path"):
            self.flag("</Parallel> without <Parallel>")
            return
        if self.state == "path":
            self.flag("<Path> not closed before </Parallel>")
        self.closed_blocks += 1
        if self.paths_per_block[-1] >= 2:
            self.num_blocks += 1
        else:
            self.flag("block with fewer than 2 paths")
        self.state, self.mark = "after_block", end

    def _path_open(self, start: int, end: int) -> None:
        if self.state == "path":
            self.flag("nested <Path>")
            return
        if self.state != "block":
            self.flag("<Path> outside a <Parallel> block")
            return
        self.paths_per_block[-1] += 1
        self.state, self.mark = "path", end

    def _path_close(self, start: int, end: int) -> None:
        if self.state != "path":
            self.flag("</Path> without <Path>")
            return
        self.spans[-1].append((self.mark, start))
        self.state = "block"

    def _summary_open(self, start: int, end: int) -> None:
        if self.state == "after_block":
            if not self.gap_is_blank(self.mark, start):
                self.flag("text between </Parallel> and <Summary>")
            self.summarised_blocks += 1
        elif self.state in ("block", "path"):
            self.flag("<Summary> inside a <Parallel> block")
            return
        elif self.state == "summary":
            self.flag("nested <Summary>")
            return
        else:
            self.flag("<Summary> without a block before it")
        self.state = "summary"

    def _summary_close(self, start: int, end: int) -> None:
        if self.state != "summary":
            self.flag("</Summary> without <Summary>")
            return
        self.num_summaries += 1
        self.state = "outside"

    def finish(self, length: int) -> ParallelStats:
        unclosed = {"block": "unclosed <Parallel>", "path": "unclosed <Path> and <Parallel>",
                    "summary": "unclosed <Summary>", "after_block": "missing <Summary> after </Parallel>"}
        if self.state in unclosed:
            self.flag(unclosed[self.state])
        if self.num_summaries != len(self.paths_per_block):
            self.flag("number of summaries differs from number of blocks")
        position = None if self.first_open is None else self.first_open / max(length, 1)
        return ParallelStats(
            num_blocks=self.num_blocks, paths_per_block=list(self.paths_per_block),
            well_formed=not self.reasons, first_block_position=position,
            num_summaries=self.num_summaries,
            has_summary_after_each_block=self.summarised_blocks == len(self.paths_per_block),
            reasons=tuple(self.reasons), path_spans=tuple(tuple(s) for s in self.spans))


def parallel_stats(text: str) -> ParallelStats:
    """Blocks, paths and well-formedness of the parallel tags in one response (see DESIGN.md).

    Well formed: every block closed, no nesting, >= 2 paths per block, every <Path> closed inside
    its block, no tag outside where it belongs, a <Summary>...</Summary> right after each
    </Parallel> (only whitespace between), as many summaries as blocks. No tags: well formed.
    """
    text = text if isinstance(text, str) else ""
    scan = _TagScan(lambda start, end: not text[start:end].strip())
    for match in _TAG.finditer(text):
        scan.feed(TAGS.index(match.group()), match.start(), match.end())
    return scan.finish(len(text))


def parallel_stats_ids(ids: list[int], tag_ids: tuple[int, int, int, int, int, int],
                       whitespace_ids: set[int] = frozenset()) -> ParallelStats:
    """`parallel_stats` on token ids; positions are token indices / len(ids).

    tag_ids: the six tag token ids in the order <Parallel>, </Parallel>, <Path>, </Path>,
    <Summary>, </Summary>. whitespace_ids: tokens allowed between </Parallel> and <Summary>.
    """
    if len(tag_ids) != 6:
        raise ValueError(f"tag_ids must hold 6 ids (<Parallel>, </Parallel>, <Path>, </Path>, "
                         f"<Summary>, </Summary>), got {len(tag_ids)}")
    ids = list(ids)
    kind_of = {int(token): kind for kind, token in enumerate(tag_ids)}
    scan = _TagScan(lambda start, end: all(token in whitespace_ids for token in ids[start:end]))
    for index, token in enumerate(ids):
        if token in kind_of:
            scan.feed(kind_of[token], index, index + 1)
    return scan.finish(len(ids))


def _canonical_number(text: str) -> str | None:
    try:
        value = Fraction(text.replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None
    return str(value.numerator) if value.denominator == 1 else str(float(value))


def path_answers(text: str) -> list[list[str | None]]:
    """Per block, the number each closed path reaches: the last number in its text (commas
    stripped, "19.0" read as "19"), None for a path without a number."""
    text = text if isinstance(text, str) else ""
    answers = []
    for spans in parallel_stats(text).path_spans:
        block = []
        for start, end in spans:
            numbers = _NUMBER.findall(text[start:end])
            block.append(_canonical_number(numbers[-1].rstrip(",")) if numbers else None)
        answers.append(block)
    return answers


def path_agreement(text: str) -> tuple[int, int]:
    """(blocks whose paths all reach the same number, blocks with >= 2 closed paths)."""
    blocks = [block for block in path_answers(text) if len(block) >= 2]
    agreeing = sum(1 for block in blocks if block[0] is not None and len(set(block)) == 1)
    return agreeing, len(blocks)

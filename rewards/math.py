"""Answer extraction and mathematical equivalence with a hard time limit per call.

Implements DESIGN.md "rewards/": `extract_answer` and `is_equivalent`.
"""
import logging
import re
from fractions import Fraction

from .worker import WorkerFailure, WorkerShelf, WorkerTimeout

logger = logging.getLogger(__name__)

_FINAL_ANSWER = re.compile(r"final answer\s*:", re.IGNORECASE)
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
# The symbolic checks run in a child process killed at the time limit (see rewards/worker.py),
# its address space capped because sympy may try to build integers with billions of digits.
CHECKER_MEMORY_LIMIT = 4 << 30
_CHECKERS = WorkerShelf(preload=("rewards.math", "math_verify", "sympy"), memory_limit=CHECKER_MEMORY_LIMIT)


def _closing_braces(text: str) -> dict[int, int]:
    """Index of the matching '}' for every '{' that is closed; one pass, so that a response full
    of unclosed boxes (a repetition loop) costs linear time, not quadratic."""
    closing, opened = {}, []
    for index, char in enumerate(text):
        if char == "{":
            opened.append(index)
        elif char == "}" and opened:
            closing[opened.pop()] = index
    return closing


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} / \\fbox{...} whose brace closes, or None."""
    boxes = list(_BOXED.finditer(text))
    if not boxes:
        return None
    closing = _closing_braces(text)
    for match in reversed(boxes):
        brace = match.end() - 1
        if brace in closing:
            return text[brace + 1:closing[brace]].strip()
    return None


def _strip_wrappers(answer: str) -> str:
    """Drop markdown bold, math delimiters and a trailing period around an answer."""
    answer = answer.strip().strip("*").strip()
    for opening, closing in (("\\(", "\\)"), ("\\[", "\\]")):
        if answer.startswith(opening) and answer.endswith(closing):
            answer = answer[len(opening):-len(closing)].strip()
    answer = answer.rstrip(".").strip()
    # Surrounding `$`, but not the `\$` of a currency sign.
    while answer.startswith("$") and answer.endswith("$") and len(answer) >= 2 \
            and not answer.endswith("\\$"):
        answer = answer[1:-1].strip()
    return answer.rstrip(".").strip()


def extract_answer(text: str) -> str | None:
    """The answer a response commits to, or None.

    The text after the last `Final Answer:` up to the end of its line (the next non-empty line
    when that is empty; a `\\boxed{}` in it is unwrapped), else the last balanced `\\boxed{...}`
    or `\\fbox{...}`. Markdown bold, surrounding `$` and a trailing period are stripped.
    """
    try:
        if not isinstance(text, str):
            return None
        finals = list(_FINAL_ANSWER.finditer(text))
        if finals:
            lines = [line for line in text[finals[-1].end():].split("\n") if line.strip(" \t*")]
            if lines:
                answer = _last_boxed(lines[0]) or _strip_wrappers(lines[0])
                if answer:
                    return answer
        boxed = _last_boxed(text)
        return _strip_wrappers(boxed) if boxed else None
    except Exception:  # extraction must never take a reward down
        return None


# ---------------------------------------------------------------- cheap normalisation, fast path

_SPACING = re.compile(r"\\[,!;: ]|\\(?:left|right)\b|\s+")
_UNIT_TEXT = re.compile(r"\\(?:text|mbox|mathrm|textbf)\{([^{}]*)\}")
_DEGREES = re.compile(r"\^\s*\{?\\circ\}?|°")
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")
_MATH_WORDS = {"pi", "sqrt", "sin", "cos", "tan", "cot", "sec", "csc", "log", "ln", "exp", "i",
               "infty", "inf", "infinity", "frac", "dfrac", "deg", "mod", "pmod", "times", "cdot"}


def _canonical_text(answer: str) -> str:
    """A spelling-insensitive form for plain string comparison (same answer, same string)."""
    text = answer.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("−", "-")
    text = _SPACING.sub("", text.replace("\\$", "").replace("$", ""))
    return text.rstrip(".")


def _strip_units(text: str) -> str:
    """Drop unit words after the last digit ("18 dollars", "5\\text{ cm}"), but not maths ("2 pi")."""
    text = _UNIT_TEXT.sub(lambda m: " " + m.group(1) + " ", text)
    text = _DEGREES.sub("", text).strip()
    # Plain string scans, not a regex: nested quantifiers over letter runs backtrack exponentially.
    last_digit = max((i for i, char in enumerate(text) if char.isdigit()), default=-1)
    words = text[last_digit + 1:].replace(".", " ").split()
    if last_digit >= 0 and words and all(w.isascii() and w.isalpha() and len(w) >= 2 for w in words) \
            and not {w.lower() for w in words} & _MATH_WORDS:
        text = text[:last_digit + 1]
    return text.strip()


def _plain_number(answer: str) -> tuple[Fraction, bool, bool] | None:
    """(value, exact, percent) when the answer is just a number, else None.

    Accepts thousands commas, `$`/`\\$`, units, a trailing period, `a/b` and `\\frac{a}{b}`.
    `exact` is False for decimals (compared to 6 places, like math-verify's float rounding).
    """
    text = answer.replace("−", "-").replace("\\$", "").replace("$", "").replace("\\!", "")
    text = text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").strip()
    text = _strip_units(text).rstrip(".").strip()
    percent = text.endswith("%")
    text = text.rstrip("%").rstrip("\\").strip()
    fraction = re.fullmatch(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}|(-?\d+)\s*/\s*(-?\d+)", text)
    if fraction:
        sign, num, den = fraction.group(1) or "", fraction.group(2) or fraction.group(4), \
            fraction.group(3) or fraction.group(5)
        if int(den) == 0:
            return None
        value = Fraction(int(num), int(den)) * (-1 if sign else 1)
        return value, True, percent
    if not _NUMBER.fullmatch(text):
        return None
    digits = text.replace(",", "")
    return Fraction(digits), "." not in digits, percent


def _numbers_match(pred: tuple[Fraction, bool, bool], gold: tuple[Fraction, bool, bool]) -> bool:
    """Equal values; a percentage stands for itself or itself / 100 (gold 50% accepts 50 and 0.5)."""
    def readings(number):
        value, _, percent = number
        return (value, value / 100) if percent else (value,)

    exact = pred[1] and gold[1]
    for p in readings(pred):
        for g in readings(gold):
            if p == g or (not exact and round(p, 6) == round(g, 6)):
                return True
    return False


# ---------------------------------------------------------------- symbolic check (child process)

_BARE_PI = re.compile(r"(?<![\\A-Za-z])pi(?![A-Za-z])")
_BARE_SQRT = re.compile(r"(?<![\\A-Za-z])sqrt\(([^()]*)\)")
_BARE_INFINITY = re.compile(r"(?<![\\A-Za-z])(?:infinity|inf)(?![A-Za-z])")


def _as_latex(answer: str) -> str:
    """Plain-text spellings LaTeX parsing would misread ("pi" is p*i) written as LaTeX."""
    answer = _BARE_SQRT.sub(r"\\sqrt{\1}", answer)
    answer = _BARE_INFINITY.sub(r"\\infty", answer)
    return _BARE_PI.sub(r"\\pi", answer)


def symbolic_equal(pred: str, gold: str) -> bool:
    """math-verify's verdict on two bare answers; runs in the checker process, no time limit here.

    Both answers are parsed as the content of a `\\boxed{}` (that is what extract_answer returns),
    with math-verify's own signal-based timeouts off: the caller's process watchdog replaces them.
    """
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    # math-verify warns once per process that its timeouts are off; that is by design here.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    config = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())
    gold_parsed = parse("\\boxed{" + _as_latex(gold) + "}", config, parsing_timeout=None)
    pred_parsed = parse("\\boxed{" + _as_latex(pred) + "}", config, parsing_timeout=None)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))


# ---------------------------------------------------------------- public check

VERDICTS = ("equal", "unequal", "timeout", "error")
# No real answer is this long (MATH-500's longest is far shorter); a longer one is a degenerate
# response, judged unequal without spending a checker's time limit on it.
MAX_ANSWER_CHARS = 1000


def judge_equivalence(pred: str | None, gold: str, timeout: float = 5.0) -> str:
    """"equal", "unequal", "timeout" or "error" (the checker failed); never raises.

    Order: plain string match after spacing/delimiter cleanup; plain numbers compared exactly
    (decimals to 6 places) without math-verify; everything else goes to math-verify in a child
    process that is killed after `timeout` seconds, which works in any thread or process.
    """
    try:
        if not timeout > 0:
            return "error"  # a zero limit would kill every checker before it could answer
        if not isinstance(pred, str) or not isinstance(gold, str) or not pred.strip() or not gold.strip():
            return "unequal"
        if len(pred) > MAX_ANSWER_CHARS and len(pred) > 2 * len(gold):
            return "unequal"
        if _canonical_text(pred) == _canonical_text(gold):
            return "equal"
        pred_number, gold_number = _plain_number(pred), _plain_number(gold)
        if pred_number is not None and gold_number is not None:
            return "equal" if _numbers_match(pred_number, gold_number) else "unequal"
        return "equal" if _CHECKERS.call(symbolic_equal, (pred, gold), timeout) else "unequal"
    except WorkerTimeout:
        return "timeout"
    except WorkerFailure as error:
        logger.debug("equivalence check failed: %s", error)
        return "error"
    except Exception as error:  # never let a strange string take a reward down
        logger.debug("equivalence check raised: %r", error)
        return "error"


def is_equivalent(pred: str | None, gold: str, timeout: float = 5.0) -> bool:
    """True when `pred` is mathematically the same answer as `gold`; False on a timeout or error.

    Numbers with thousands commas, `$` and units ("$1,080." == "1080", "18 dollars" == "18"),
    fractions and decimals ("1/2" == "0.5" == "\\frac{1}{2}"), LaTeX or plain, intervals and
    tuples. A percentage stands for itself or itself / 100: gold "50%" accepts "50%", "50" and
    "0.5" (the usual choice of math graders); "0.5" and "50" without a % sign differ.
    The call takes at most about `timeout` seconds in any thread; the first call of a process
    that needs the symbolic check also waits for the checker process to start (about 1 s).
    """
    return judge_equivalence(pred, gold, timeout) == "equal"

"""Text normalisation, tokens and fuzzy word matching for the Classifier Engine (the one tokeniser it uses).

Questions arrive with typos, Unicode forms (``NO₂``, ``PM₂.₅``, fullwidth digits, curly quotes, accents) and in any
word order; vocabulary phrases are matched against them token by token.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Sequence

__all__ = ["find_phrase", "match_phrase", "normalise", "similar", "tokens"]

_QUOTES = str.maketrans({"‘": "'", "’": "'", "“": '"', "”": '"', "´": "'", "`": "'", "μ": "u", "µ": "u"})
_SUFFIXES = frozenset({"s", "es", "est", "er", "ers", "ness", "y", "ing", "ed", "d", "iest", "ier", "ly"})
_DECIMAL_COMMA = re.compile(r"(?<=\d),(?=\d(?!\d\d(?!\d)))")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d\d\d(?!\d))")
_COMPARATORS = (
    (">=", " above "),
    ("<=", " below "),
    ("≥", " above "),
    ("≤", " below "),
    (">", " above "),
    ("<", " below "),
)
_TOKEN = re.compile(r"[a-z0-9]+(?:[.'][a-z0-9]+)*")


def normalise(text: str) -> str:
    """Lower case, NFKC (subscripts and fullwidth forms become ASCII digits), accents folded, quotes straightened."""
    t = unicodedata.normalize("NFKC", text).translate(_QUOTES)
    t = "".join(ch for ch in unicodedata.normalize("NFKD", t) if not unicodedata.combining(ch))
    t = re.sub(r"(?<=\w)'s\b", "", t.lower())  # possessive: "the harbour's" is the harbour
    t = _DECIMAL_COMMA.sub(".", t)  # "pm2,5", "12,5": a decimal comma (a comma before three digits groups thousands)
    t = _THOUSANDS.sub("", t)
    for sym, word in _COMPARATORS:  # "NO2 > 45?": the symbol is the user's limit
        t = t.replace(sym, word)
    return " ".join(t.split())


def tokens(text: str) -> list[str]:
    """Word tokens of normalised text; a decimal point or apostrophe inside a token is kept (``pm2.5``, ``i'm``)."""
    return _TOKEN.findall(normalise(text))


def _edits(a: str, b: str, limit: int) -> int:
    """Damerau-Levenshtein distance, or ``limit + 1`` once it must exceed ``limit``."""
    if abs(len(a) - len(b)) > limit:
        return limit + 1
    prev2: list[int] = []
    prev = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        cur = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cost = 0 if a[i - 1] == b[j - 1] else 1
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                cur[j] = min(cur[j], prev2[j - 2] + 1)
        if min(cur) > limit:
            return limit + 1
        prev2, prev = prev, cur
    return prev[-1]


@functools.lru_cache(maxsize=1 << 16)
def similar(word: str, target: str) -> bool:
    """Same word up to inflection or a typo: one edit from 5 letters on, two from 9; a plural 's' is free."""
    if word == target or word.replace(".", "") == target.replace(".", ""):  # "pm2.5" is the modality "pm25"
        return True
    if "0" in word and "o" in target and word.replace("0", "o") == target.replace("0", "o"):  # "sp02", "n02"
        return True
    if word.rstrip("s") == target.rstrip("s") and len(target) > 2:
        return True
    if len(target) >= 4 and word.startswith(target) and word[len(target) :] in _SUFFIXES:
        return True
    if len(target) < 7 or len(word) < 5 or any(c.isdigit() for c in target):
        return False
    return _edits(word, target, 2 if len(target) >= 9 else 1) <= (2 if len(target) >= 9 else 1)


def match_phrase(words: Sequence[str], phrase: Sequence[str], *, fuzzy: bool = True) -> tuple[int, int] | None:
    """(start, number of question tokens) where ``phrase`` occurs in ``words``, each token exact or, with
    ``fuzzy``, similar; a two-token phrase may also match as one glued token (``heartrate``, ``oldtown``)."""
    n = len(phrase)
    if n == 0:
        return None
    first = phrase[0]
    for i in range(len(words) - n + 1):
        w = words[i]
        if w != first and not (fuzzy and similar(w, first)):
            continue  # most phrases fail on their first word: no generator, no loop
        if n == 1 or all(
            (words[i + k] == phrase[k]) or (fuzzy and similar(words[i + k], phrase[k])) for k in range(1, n)
        ):
            return i, n
    if n == 2:
        glued = phrase[0] + phrase[1]
        for i, w in enumerate(words):
            if w == glued or (fuzzy and similar(w, glued)):
                return i, 1
    return None


def find_phrase(words: Sequence[str], phrase: Sequence[str], *, fuzzy: bool = True) -> int:
    """Index where ``phrase`` occurs in ``words`` (see :func:`match_phrase`), or -1."""
    m = match_phrase(words, phrase, fuzzy=fuzzy)
    return -1 if m is None else m[0]

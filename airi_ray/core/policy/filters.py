"""Content filters on prompts, retrieved documents and answers, whole or streamed.

Rules and what each can do (``Action``: off, flag, redact, block):

- PII: ``email``, ``phone`` (North American forms and ``+`` international numbers of 7 to
  15 digits), ``card`` (13 to 19 digits, Luhn-checked: a number that fails Luhn is left
  alone), ``national_id`` (US SSN ``123-45-6789``, with the invalid areas 000, 666 and
  9xx excluded) and ``iban`` (checked with mod 97). Redaction writes ``[EMAIL]``,
  ``[PHONE]``...
- ``blocklist``: case-insensitive whole-word phrases (words may be separated by 1 to 4
  whitespace characters); redaction writes ``[BLOCKED]``.
- ``prompt_injection``: the heuristic of ``heuristics.py``, on input only (prompts and
  retrieved documents); redaction removes the matched phrasing (``[REMOVED]``).

A blocking rule raises ``ContentBlocked`` (400 or 403, per the config) naming the rule;
findings report rule names and counts, never the matched text.

How the text is scanned: the span rules (PII and block list) are found by a few searchers,
each returning the leftmost match at or after a position; the scan takes the leftmost of
all, applies it and continues after it. Every rule decides a match at position ``s`` from
a bounded window around ``s`` (at most ``hold_back`` characters, or for an email from its
whitespace-free run), which is what lets ``StreamFilter`` emit a stream chunk by chunk and
produce exactly what the whole text would give. The searchers start from rare characters
(digits, ``@``, the first letters of phrases) so the regex engine skips most of the text.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from airi_ray.core.policy.audit import ACTIONS, Action, Finding
from airi_ray.core.policy.errors import ContentBlocked
from airi_ray.core.policy.heuristics import INJECTION_THRESHOLD, InjectionHeuristic

PII_RULES = ("email", "phone", "card", "national_id", "iban")
REPLACEMENTS = {
    "email": "[EMAIL]",
    "phone": "[PHONE]",
    "card": "[CARD]",
    "national_id": "[NATIONAL_ID]",
    "iban": "[IBAN]",
    "blocklist": "[BLOCKED]",
    "prompt_injection": "[REMOVED]",
}
_WHAT = {
    "email": "email addresses",
    "phone": "phone numbers",
    "card": "payment card numbers",
    "national_id": "national id numbers",
    "iban": "bank account numbers (IBAN)",
    "blocklist": "blocked phrases",
}
MAX_PHRASE_CHARS = 200
MIN_HOLD_BACK = 64  # covers every PII pattern but email (at most 45 characters)
EMAIL_WINDOW = 640  # covers the longest email the pattern accepts (64 + 1 + 536 + 1)
_CONTEXT = 8  # characters kept before the unscanned text, for the rules' look-behinds
_PHRASES_SEPARATELY = 16  # up to this many phrases, one literal-prefixed regex each

Span = tuple[int, int, str]  # start, end, rule
Searcher = Callable[[str, str, int], Span | None]  # (text, lowercased text, pos)


@dataclass(frozen=True, slots=True)
class FilterConfig:
    """What each filter does, for one tenant and model (and direction: input or output)."""

    email: Action = "redact"
    phone: Action = "redact"
    card: Action = "redact"
    national_id: Action = "redact"
    iban: Action = "redact"
    blocklist: tuple[str, ...] = ()
    blocklist_action: Action = "block"
    injection: Action = "flag"
    injection_threshold: float = INJECTION_THRESHOLD
    blocked_status: int = 400

    def __post_init__(self) -> None:
        for name in (*PII_RULES, "blocklist_action", "injection"):
            if getattr(self, name) not in ACTIONS:
                raise ValueError(f"{name} is one of {ACTIONS}, not {getattr(self, name)!r}")
        for phrase in self.blocklist:
            if not phrase.strip() or len(phrase) > MAX_PHRASE_CHARS:
                raise ValueError(
                    f"a blocklist phrase has 1 to {MAX_PHRASE_CHARS} characters and a word"
                )
        if not (math.isfinite(self.injection_threshold) and self.injection_threshold > 0):
            raise ValueError(f"injection_threshold must be > 0, got {self.injection_threshold}")
        if self.blocked_status not in (400, 403):
            raise ValueError(f"blocked_status is 400 or 403, not {self.blocked_status}")


@dataclass(frozen=True, slots=True)
class FilterResult:
    """The text to pass on, and what was found (rule names and counts only)."""

    text: str
    findings: tuple[Finding, ...]


class FilterSet:
    """The filters of one config, compiled once; reused for every request."""

    def __init__(self, config: FilterConfig | None = None) -> None:
        c = FilterConfig() if config is None else config
        self.config = c
        self._actions: dict[str, Action] = {rule: getattr(c, rule) for rule in PII_RULES}
        self._actions["blocklist"] = c.blocklist_action if c.blocklist else "off"
        self._actions["prompt_injection"] = c.injection
        searchers: list[Searcher] = []
        if self._actions["email"] != "off":
            searchers.append(_find_email)
        numeric = [r for r in ("iban", "card", "national_id", "phone") if self._actions[r] != "off"]
        if numeric:
            searchers.append(_NumericSearcher(frozenset(numeric)).find)
        widths = [MIN_HOLD_BACK]
        if self._actions["blocklist"] != "off":
            patterns = [_phrase_pattern(p) for p in c.blocklist]
            widths += [w + 2 for _, w in patterns]
            if len(patterns) <= _PHRASES_SEPARATELY:
                searchers += [_PhraseSearcher(re.compile(p)).find for p, _ in patterns]
            else:
                searchers.append(_PhraseSearcher(re.compile("|".join(p for p, _ in patterns))).find)
        self._searchers = tuple(searchers)
        self._uses_low = self._actions["blocklist"] != "off"
        self._email = self._actions["email"] != "off"
        self._injection = InjectionHeuristic() if c.injection != "off" else None
        self.hold_back = max(widths)

    def check_input(self, text: str, *, where: str = "prompt") -> FilterResult:
        """Filter a prompt or a retrieved document: injection heuristic, PII, block list.

        ``where`` names the text in a refusal ("prompt", "document"...).

        Raises:
            ContentBlocked: a rule whose action is ``block`` matched.
        """
        counts: dict[str, int] = {}
        c = self.config
        low = _lower(text) if self._uses_low or self._injection is not None else ""
        if self._injection is not None:
            verdict = self._injection.score(low, spans=c.injection == "redact")
            if verdict.score >= c.injection_threshold:
                if c.injection == "block":
                    raise ContentBlocked(
                        f"the {where} was blocked by the prompt-injection filter (score "
                        f"{verdict.score:.1f}, threshold {c.injection_threshold:.1f}; matched: "
                        f"{', '.join(verdict.families)})",
                        rule="prompt_injection",
                        status=c.blocked_status,
                    )
                if c.injection == "redact":
                    text = _replace(text, verdict.spans, REPLACEMENTS["prompt_injection"])
                    low = _lower(text) if self._uses_low else ""
                    counts["prompt_injection"] = len(verdict.spans)
                else:
                    counts["prompt_injection"] = 1
        return FilterResult(self._filter_all(text, low, counts, where), self._findings(counts))

    def check_output(self, text: str, *, where: str = "answer") -> FilterResult:
        """Filter a whole answer: PII and block list (what ``stream`` does chunk by chunk).

        Raises:
            ContentBlocked: a rule whose action is ``block`` matched.
        """
        counts: dict[str, int] = {}
        low = _lower(text) if self._uses_low else ""
        return FilterResult(self._filter_all(text, low, counts, where), self._findings(counts))

    def stream(self, *, where: str = "answer") -> StreamFilter:
        """A filter for one streamed answer."""
        return StreamFilter(self, where=where)

    def _filter_all(self, text: str, low: str, counts: dict[str, int], where: str) -> str:
        pieces, pos = self._apply(text, low, 0, len(text), counts, where)
        if not pieces:
            return text
        pieces.append(text[pos:])
        return "".join(pieces)

    def _apply(
        self, text: str, low: str, pos: int, stop: int, counts: dict[str, int], where: str
    ) -> tuple[list[str], int]:
        """Apply the span rules to matches starting in ``[pos, stop)``.

        Returns the output pieces for ``text[pos:new_pos]`` and ``new_pos`` (the end of the
        last match, or ``pos`` if none): the caller emits the rest up to ``stop`` as is.
        """
        searchers = self._searchers
        # Each searcher's next match at or after pos; still valid while it starts >= pos.
        ahead: list[Span | None] = [find(text, low, pos) for find in searchers]
        pieces: list[str] = []
        while True:
            best: Span | None = None
            for i, hit in enumerate(ahead):
                if hit is not None and hit[0] < pos:
                    hit = ahead[i] = searchers[i](text, low, pos)
                if hit is not None and (best is None or hit[0] < best[0]):
                    best = hit
            if best is None or best[0] >= stop:
                return pieces, pos
            start, end, rule = best
            action = self._actions[rule]
            if action == "block":
                raise ContentBlocked(
                    f"the {where} was blocked by content filter rule '{rule}' "
                    f"({_WHAT[rule]} are not allowed)",
                    rule=rule,
                    status=self.config.blocked_status,
                )
            counts[rule] = counts.get(rule, 0) + 1
            pieces.append(text[pos:start])
            pieces.append(REPLACEMENTS[rule] if action == "redact" else text[start:end])
            pos = end

    def _findings(self, counts: dict[str, int]) -> tuple[Finding, ...]:
        return tuple(Finding(rule, self._actions[rule], n) for rule, n in sorted(counts.items()))


class StreamFilter:
    """Filters a streamed answer chunk by chunk, with a rolling hold-back window.

    ``feed`` returns the text that is safe to emit: everything but the last ``hold_back``
    characters (more while an email-like run without whitespace is open), so a phone
    number or an email split across chunks is still caught. ``finish`` flushes the rest.
    The concatenated output equals ``FilterSet.check_output`` of the whole text.
    """

    def __init__(self, filters: FilterSet, *, where: str = "answer") -> None:
        self._f = filters
        self._where = where
        self._raw = ""  # _CONTEXT characters already emitted, then the pending text
        self._pos = 0  # where the pending text starts in _raw
        self._counts: dict[str, int] = {}

    @property
    def findings(self) -> tuple[Finding, ...]:
        """What was found so far (rule names and counts)."""
        return self._f._findings(self._counts)

    @property
    def pending(self) -> int:
        """Characters received but not yet emitted."""
        return len(self._raw) - self._pos

    def feed(self, chunk: str) -> str:
        """Take the next chunk; return the text now safe to emit (possibly "").

        Raises:
            ContentBlocked: a blocking rule matched; the stream should end with the error.
        """
        raw = self._raw + chunk
        return self._emit(raw, self._safe_stop(raw))

    def finish(self) -> str:
        """The end of the stream: return the rest, filtered."""
        return self._emit(self._raw, len(self._raw))

    def _safe_stop(self, raw: str) -> int:
        n = len(raw)
        stop = n - self._f.hold_back
        if stop <= self._pos or not self._f._email:
            return stop
        # An email lies within a run without whitespace. If the run that ends the buffer
        # began before `stop`, hold the whole run back (up to the longest email).
        if _WS.search(raw, stop) is not None:
            return stop
        lo = max(self._pos, n - EMAIL_WINDOW)
        m = _WS.search(raw[lo:stop][::-1])
        return lo if m is None else stop - m.start()

    def _emit(self, raw: str, stop: int) -> str:
        pos = self._pos
        if stop <= pos:
            self._raw = raw
            return ""
        low = _lower(raw) if self._f._uses_low else ""
        pieces, pos = self._f._apply(raw, low, pos, stop, self._counts, self._where)
        if pos < stop:
            pieces.append(raw[pos:stop])
            pos = stop
        keep = max(0, pos - _CONTEXT)
        self._raw = raw[keep:]
        self._pos = pos - keep
        return "".join(pieces)


# --- PII --------------------------------------------------------------------------------

_WS = re.compile(r"\s")
_LOCAL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._%+-")
_MAX_LOCAL = 64
_DOMAIN = re.compile(
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.){1,8}[A-Za-z]{2,24}(?![A-Za-z0-9-])"
)


def _find_email(text: str, low: str, pos: int) -> Span | None:
    """The leftmost email starting at or after ``pos``.

    Anchored on ``@`` (found by ``str.find``), then the local part is the run of local
    characters before it (1 to 64, starting after a non-local character) and the domain
    must match ``_DOMAIN``. An email starting before ``pos`` is not one of ours.
    """
    at = text.find("@", pos + 1)
    while at != -1:
        start = at
        floor = max(0, at - _MAX_LOCAL)
        while start > floor and text[start - 1] in _LOCAL_CHARS:
            start -= 1
        if (
            start < at
            and start >= pos
            and (start == 0 or text[start - 1] not in _LOCAL_CHARS)
            and (m := _DOMAIN.match(text, at)) is not None
        ):
            return start, m.end(), "email"
        at = text.find("@", at + 1)
    return None


# Numeric PII: (rule, first character class, pattern after the first character, offset of
# the first character in the match). The first character is matched outside the
# alternation so the regex engine can skip to candidates (digits, "+", "("), and a digit
# inside a run of digits is dropped at once; each branch then checks the characters around
# it with look-behinds. An IBAN is found from its first check digit, two characters in.
_NUMERIC_BRANCHES: tuple[tuple[str, str, str, int], ...] = (
    (
        "iban",
        "0-9",
        r"(?<=(?<![A-Za-z0-9])[A-Z]{2}[0-9])[0-9](?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?"
        r"(?![A-Za-z0-9])",
        2,
    ),
    ("card", "0-9", r"(?<=[0-9])(?:[ -]?[0-9]){12,18}(?![0-9])", 0),
    ("national_id", "0-9", r"(?<=[0-9])(?<!-.)[0-9]{2}-[0-9]{2}-[0-9]{4}(?![0-9-])", 0),
    ("phone", "+", r"(?<=\+)(?<![0-9+].)[1-9][0-9]{0,2}(?:[ .-]?[0-9]{1,4}){2,6}(?![0-9])", 0),
    ("phone", "(", r"(?<=\()(?<![0-9+].)[2-9][0-9]{2}\)[ .-]?[0-9]{3}[ .-]?[0-9]{4}(?![0-9])", 0),
    (
        "phone",
        "0-9",
        r"(?<=[0-9])(?<!\+.)(?:(?<=1)[ .-]?[2-9][0-9]{2}|(?<=[2-9])[0-9]{2})"
        r"[ .-]?[0-9]{3}[ .-]?[0-9]{4}(?![0-9])",
        0,
    ),
)


def luhn_valid(digits: str) -> bool:
    """Whether a string of ASCII digits passes the Luhn check (payment card numbers)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_valid(iban: str) -> bool:
    """Whether an IBAN (spaces allowed) has a valid length and mod-97 check digits."""
    s = iban.replace(" ", "").upper()
    if not 15 <= len(s) <= 34 or not s.isascii() or not s.isalnum():
        return False
    return int("".join(str(int(ch, 36)) for ch in s[4:] + s[:4])) % 97 == 1


def _card_valid(text: str) -> bool:
    return luhn_valid(text.replace(" ", "").replace("-", ""))


def _national_id_valid(text: str) -> bool:
    area, group, serial = text.split("-")
    return area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000"


def _phone_digits_valid(text: str) -> bool:
    return 7 <= sum(ch.isdigit() for ch in text) <= 15  # E.164: at most 15 digits


_VALIDATORS: dict[int, Callable[[str], bool]] = {
    0: iban_valid,
    1: _card_valid,
    2: _national_id_valid,
    3: _phone_digits_valid,
}


def _numeric_regex(branches: list[int]) -> re.Pattern[str] | None:
    if not branches:
        return None
    first = sorted({_NUMERIC_BRANCHES[i][1] for i in branches})
    alternatives = "|".join(f"{_NUMERIC_BRANCHES[i][2]}(?P<b{i}>)" for i in branches)
    # (?<![0-9][0-9]): no branch starts inside a run of digits.
    return re.compile(f"[{''.join(first)}](?<![0-9][0-9])(?:{alternatives})")


class _NumericSearcher:
    """Card, national id, phone and IBAN in one regex; validated matches only."""

    def __init__(self, rules: frozenset[str]) -> None:
        branches = [i for i, b in enumerate(_NUMERIC_BRANCHES) if b[0] in rules]
        self._rx = _numeric_regex(branches)
        # If branch i matches but fails validation, the later branches are tried there.
        self._after = {i: _numeric_regex(branches[k + 1 :]) for k, i in enumerate(branches)}

    def find(self, text: str, low: str, pos: int) -> Span | None:
        rx = self._rx
        assert rx is not None  # built with at least one rule
        at = pos
        while (m := rx.search(text, at)) is not None:
            first = m.start()
            while m is not None:
                i = int(str(m.lastgroup)[1:])
                rule, _, _, offset = _NUMERIC_BRANCHES[i]
                start = first - offset
                valid = _VALIDATORS.get(i)
                if start >= pos and (valid is None or valid(text[start : m.end()])):
                    return start, m.end(), rule
                later = self._after[i]
                m = later.match(text, first) if later is not None else None
            at = first + 1
        return None


# --- block list ---------------------------------------------------------------------------


def _phrase_pattern(phrase: str) -> tuple[str, int]:
    """A phrase as a regex on lowercased text, and the longest text it matches (+1)."""
    words = _lower(phrase).split()
    first = words[0]
    pattern = (
        re.escape(first)
        # After the first word (so the regex has a literal prefix to search for): the
        # phrase must not start inside a word.
        + rf"(?<!\w[\s\S]{{{len(first)}}})"
        + "".join(r"\s{1,4}" + re.escape(w) for w in words[1:])
        + r"(?!\w)"
    )
    return pattern, sum(map(len, words)) + 4 * (len(words) - 1) + 1


class _PhraseSearcher:
    def __init__(self, rx: re.Pattern[str]) -> None:
        self._rx = rx

    def find(self, text: str, low: str, pos: int) -> Span | None:
        m = self._rx.search(low, pos)
        return None if m is None else (m.start(), m.end(), "blocklist")


# --- helpers ------------------------------------------------------------------------------


class _LowerTable(dict[int, str]):
    """Per-character lowercase for ``str.translate``, keeping the text's length."""

    def __missing__(self, code: int) -> str:
        low = chr(code).lower()
        value = low if len(low) == 1 else chr(code)  # "İ".lower() is two characters
        if len(self) < 65_536:
            self[code] = value
        return value


_LOWER = _LowerTable()


def _lower(text: str) -> str:
    """Lowercase with one character per character, so offsets match the original.

    ``str.lower`` of non-ASCII text can change the length ("İ") or depend on context
    (final sigma), which would break offsets and make a stream differ from the whole.
    """
    return text.lower() if text.isascii() else text.translate(_LOWER)


def _replace(text: str, spans: tuple[tuple[int, int], ...], replacement: str) -> str:
    """Replace the (sorted, possibly overlapping) spans of ``text``."""
    pieces: list[str] = []
    pos = 0
    for start, end in spans:
        if end <= pos:
            continue
        pieces.append(text[pos : max(pos, start)])
        if start >= pos:
            pieces.append(replacement)
        pos = end
    pieces.append(text[pos:])
    return "".join(pieces)


# Where a stored turn is checked: tool output as a retrieved document, the rest as prompt.
TURN_WHERE = {"tool": "document"}


def filter_turns(
    filters: FilterSet | None, turns: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Conversation turns as the tenant's input filters hand them on, for storing: a
    redacted item is never written in clear. Tool output is checked as a document, every
    other turn as prompt, as a chat call checks them; other keys (``seq``) are kept, and a
    turn that is not an object with text content is left as it is, for the store to refuse.

    Raises:
        ContentBlocked: a blocking rule matched a turn (it would never reach a model).
    """
    out: list[Any] = []
    for t in turns:
        if filters is None or not isinstance(t, Mapping):
            out.append(dict(t) if isinstance(t, Mapping) else t)
            continue
        content = t.get("content")
        if not isinstance(content, str):
            out.append(dict(t))
            continue
        where = TURN_WHERE.get(str(t.get("role")), "prompt")
        out.append({**t, "content": filters.check_input(content, where=where).text})
    return out

r"""Expert name patterns: the subset of Python regular expressions that matches in linear time.

``ZeroSpec.experts`` patterns are read back from checkpoints, so they are untrusted input, and
Python's ``re`` is a backtracking engine: ``(a+)+$`` takes exponential time on ``"aaaa…!"`` and
even ``\d+\d+x`` takes cubic time on a long run of digits. A pattern is accepted only when it
belongs to a subset whose backtracking is provably bounded: every way ``re.search`` can spend
time is paid for by the length of the key it searches, times a constant that the limits below
bound. The rule, checked on the parse tree that ``re`` itself compiles:

1. *Constructs*: literal characters, ``.``, character classes ``[...]``, ``\d \w \s`` and their
   negations, the anchors ``^ $ \A \Z \b \B``, groups (capturing, named, non-capturing, with
   flags), alternation ``|``, and the quantifiers ``* + ? {m,n}`` (greedy, lazy or possessive)
   applied to one character (a literal, a class or ``.``); ``?`` may also make a group
   optional. Not allowed: any other quantifier on a group, an alternation or a sequence
   (``(a+)+``, ``(a|b)*``, ``(?:ab){3}``), backreferences,
   lookarounds, conditionals, atomic groups, and the ``i`` (ignore case) flag; write
   ``[Ee]xperts`` instead.
2. *No ambiguous split*: a quantifier whose count varies (``*``, ``+``, ``?``, ``{m,n}``, not
   possessive) must be followed by a character it cannot match, or by the pattern's end: what
   may come next (through group ends and alternatives, skipping anchors) is disjoint from it.
   ``experts\.(\d+)\.`` is fine (a digit run ends exactly where the ``.`` is); ``\d+\d+`` and
   ``.*x`` are not. Each shorter split such a quantifier backtracks to fails (or ends the
   match) at the next character, so it costs one pass over its run.
3. *No rescanning*: a pattern with an unbounded quantifier (``*``, ``+``, ``{m,}``) must begin
   with ``^`` or ``\A``, or its fixed leading part (every way through it) must hold a character
   that the quantifier cannot match, as ``experts\.`` holds ``e`` for ``\d+``. Otherwise
   ``re.search`` restarts inside every run and rescans it (``\d+\.`` is quadratic on digits).
4. *Sizes*: at most :data:`MAX_PATTERN_CHARS` characters and a group 1 (the expert id); a
   match attempt costs at most :data:`MAX_COST` steps (``_work``: character tests, group and
   alternative entries, repetition counts; alternatives multiply), and so do all of a spec's
   patterns together, at most :data:`MAX_PATTERNS` of them, since each is searched in every
   key. ``ZeroSpec.expert_of`` refuses tensor paths of more than :data:`MAX_KEY_CHARS`
   characters, the length at which that budget is measured.

Why this is enough: by rule 2 each attempt follows one way through each alternative and makes
no choice inside a run, so it costs at most its steps plus the runs it scans; by rule 3 a run
cannot contain the start of another attempt's fixed leading part, so runs are not rescanned by
later starts. A search therefore costs about ``steps * len(key)`` character tests.

Measured worst case (tests/test_spec_hostile.py, hypothesis-generated patterns of this subset
and hand-built ones at the budget, against keys of 2048 characters built from each pattern's
own characters): at most 3.2 ns per character per step, so a spec at the full budget costs
about 3.4 ms for a path of 2048 characters; the worst single pattern found took 3.2 ms
(``(\D{0,38})\d``, 492 steps). ``(a+)+$``-style patterns, which this refuses, take hours.
"""

from __future__ import annotations

import functools
import re
import sys
from dataclasses import dataclass
from typing import Any, NamedTuple

from zckpt.errors import SpecError

if sys.version_info >= (3, 11):
    from re import _parser as _sre  # type: ignore[attr-defined]
else:  # pragma: no cover - the parser's name before 3.11
    import sre_parse as _sre

__all__ = [
    "MAX_COST",
    "MAX_EXPERT_ID",
    "MAX_KEY_CHARS",
    "MAX_PATTERNS",
    "MAX_PATTERN_CHARS",
    "compile_expert_pattern",
    "compile_expert_patterns",
]

MAX_PATTERNS = 8  # patterns in one spec: each is searched in every key of every tensor path
MAX_PATTERN_CHARS = 256
MAX_COST = 512  # steps of one match attempt, summed over a spec's patterns (see _work)
MAX_KEY_CHARS = 2048  # characters of a tensor path (its str keys) that patterns are matched to
_CAP = 1 << 20
_START = 32  # what starting an attempt costs re, in steps: every pattern pays it per character
MAX_EXPERT_ID = 1 << 20  # expert ids are below this (a million experts)
_MAX_FINITE = 1024  # a class of at most this many characters is enumerated to test overlaps

_MAXREPEAT = _sre.MAXREPEAT
_CATEGORY = {
    "CATEGORY_DIGIT": r"\d",
    "CATEGORY_NOT_DIGIT": r"\D",
    "CATEGORY_SPACE": r"\s",
    "CATEGORY_NOT_SPACE": r"\S",
    "CATEGORY_WORD": r"\w",
    "CATEGORY_NOT_WORD": r"\W",
}
_NO_IGNORECASE = "it uses the ignore-case flag (?i); spell the cases out instead, as in [Ee]xperts"
_FORBIDDEN = {
    "GROUPREF": "a backreference",
    "GROUPREF_EXISTS": "a conditional (?(...)...)",
    "ASSERT": "a lookahead or lookbehind",
    "ASSERT_NOT": "a negative lookahead or lookbehind",
    "ATOMIC_GROUP": "an atomic group (?>...)",
}


def _name(op: Any) -> str:
    return str(getattr(op, "name", op))  # the parser's opcodes are named int constants


# ---------------------------------------------------------------------------------- the IR


@dataclass(frozen=True)
class _Atom:
    """One character: its regex (flags included) and, when small, its exact set."""

    src: str
    text: str  # as written, near enough, for messages
    finite: frozenset[int] | None
    category: tuple[str, bool] | None  # (\d, \s or \w, negated) for a lone category

    def matches(self, c: int) -> bool:
        return _one(self.src).fullmatch(chr(c)) is not None


@dataclass(frozen=True)
class _Anchor:
    start: bool  # ^ (not multiline) or \A: the match can only begin at the key's start


@dataclass(frozen=True)
class _Repeat:
    atom: _Atom
    lo: int
    hi: int | None  # None: unbounded
    possessive: bool
    text: str  # for messages


@dataclass(frozen=True)
class _Group:
    items: tuple[Any, ...]


@dataclass(frozen=True)
class _Alt:
    alts: tuple[tuple[Any, ...], ...]


@functools.lru_cache(maxsize=256)
def _one(src: str) -> re.Pattern[str]:
    return re.compile(src)


def _u(c: int) -> str:
    return f"\\U{c:08x}"


def _c(c: int) -> str:
    ch = chr(c)
    return ch if ch.isprintable() and ch not in "\\]^-" else _u(c)


class _RejectError(Exception):
    pass


def _atom(op: str, av: Any, flags: int) -> _Atom:
    prefix = ("(?s)" if flags & re.DOTALL else "") + ("(?a)" if flags & re.ASCII else "")
    if op == "LITERAL":
        return _Atom(prefix + _u(av), _c(av), frozenset([av]), None)
    if op == "NOT_LITERAL":
        return _Atom(prefix + f"[^{_u(av)}]", f"[^{_c(av)}]", None, None)
    if op == "ANY":
        return _Atom(prefix + ".", ".", None, None)
    parts, shown, chars, negate, cats = [], [], set(), False, []
    for iop, iav in av:
        n = _name(iop)
        if n == "NEGATE":
            negate = True
        elif n == "LITERAL":
            parts.append(_u(iav))
            shown.append(_c(iav))
            chars.add(iav)
        elif n == "RANGE":
            lo, hi = iav
            parts.append(f"{_u(lo)}-{_u(hi)}")
            shown.append(f"{_c(lo)}-{_c(hi)}")
            if len(chars) + hi - lo < _MAX_FINITE:
                chars.update(range(lo, hi + 1))
            else:
                chars.add(-1)  # too many to enumerate
        elif n == "CATEGORY" and _name(iav) in _CATEGORY:
            parts.append(_CATEGORY[_name(iav)])
            shown.append(_CATEGORY[_name(iav)])
            cats.append(_name(iav))
        else:
            raise _RejectError(f"the character class item {n} {iav} is not supported")
    src = prefix + "[" + ("^" if negate else "") + "".join(parts) + "]"
    if len(shown) == 1 and cats and not negate:
        text = shown[0]
    else:
        text = "[" + "^" * negate + "".join(shown) + "]"
    finite = frozenset(chars) if not negate and not cats and -1 not in chars else None
    category = None
    if len(parts) == 1 and len(cats) == 1:
        base = cats[0].replace("NOT_", "")
        category = (base + ("a" if flags & re.ASCII else ""), negate != ("NOT_" in cats[0]))
    return _Atom(src, text, finite, category)


_ATOMS = ("LITERAL", "NOT_LITERAL", "ANY", "IN")


def _build(seq: Any, flags: int) -> tuple[Any, ...]:
    """The IR of a parsed sequence, rejecting what the rule does not allow."""
    out: list[Any] = []
    for op, av in seq:
        n = _name(op)
        if n in _ATOMS:
            out.append(_atom(n, av, flags))
        elif n == "AT":
            start = _name(av) == "AT_BEGINNING_STRING" or (
                _name(av) == "AT_BEGINNING" and not flags & re.MULTILINE
            )
            out.append(_Anchor(start))
        elif n == "SUBPATTERN":
            _gid, add, delete, sub = av
            inner = (flags | add) & ~delete
            if inner & re.IGNORECASE:
                raise _RejectError(_NO_IGNORECASE)
            out.append(_Group(_build(sub, inner)))
        elif n == "BRANCH":
            out.append(_Alt(tuple(_build(alt, flags) for alt in av[1])))
        elif n in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
            lo, hi, body = av
            what = _quantifier_text(lo, hi, n)
            if (lo, hi) == (0, 1) and (len(body) != 1 or _name(body[0][0]) not in _ATOMS):
                # An optional group or sequence is an alternation: it, or nothing.
                out.append(_Alt(((_Group(_build(body, flags)),), ())))
                continue
            if len(body) != 1 or _name(body[0][0]) not in _ATOMS:
                raise _RejectError(
                    f"the quantifier {what} applies to {_describe(body)}: quantifiers may only "
                    f"repeat one character (a literal, a class or '.'), since a repeated group "
                    f"or alternation can backtrack exponentially"
                )
            atom = _atom(_name(body[0][0]), body[0][1], flags)
            top = None if hi == _MAXREPEAT else int(hi)
            out.append(_Repeat(atom, int(lo), top, n == "POSSESSIVE_REPEAT", what))
        elif n in _FORBIDDEN:
            raise _RejectError(f"{_FORBIDDEN[n]} is not allowed (it defeats the linear-time rule)")
        else:
            raise _RejectError(f"the construct {n} is not supported")
    return tuple(out)


def _quantifier_text(lo: int, hi: int, op: str) -> str:
    unbounded = hi == _MAXREPEAT
    base = {(0, True): "*", (1, True): "+"}.get((lo, unbounded))
    if base is None and lo == hi:
        base = f"{{{lo}}}"
    elif base is None:
        base = "?" if (lo, hi) == (0, 1) else f"{{{lo},{'' if unbounded else hi}}}"
    return base + {"MIN_REPEAT": "?", "POSSESSIVE_REPEAT": "+"}.get(op, "")


def _describe(body: Any) -> str:
    if not body:
        return "an empty group"
    if len(body) == 1:
        n = _name(body[0][0])
        return {"SUBPATTERN": "a group", "BRANCH": "an alternation", "AT": "an anchor"}.get(
            n, f"a {n.lower()}"
        )
    return "a sequence of several items"


# ---------------------------------------------------------------------------------- measures


def _work(items: tuple[Any, ...]) -> tuple[int, int]:
    """(ways through ``items``, steps summed over those ways): what one match attempt can cost.

    Steps are weighted by what they cost ``re``, measured on adversarial keys (tests in
    tests/test_spec_hostile.py): a character test 2, entering a group or an alternative 2, a
    fixed repeat 2 per character, a varying bounded repeat 12 per character of its maximum (it
    runs, then gives back one character at a time and retries the rest of the pattern at
    each), an unbounded one 2 per character of its minimum plus 6 (its run is paid for by the
    key's length, rules 2 and 3). Capped."""
    ways, steps = 1, 0
    for it in items:
        if isinstance(it, (_Group, _Alt)):
            subs = [_work(it.items)] if isinstance(it, _Group) else [_work(a) for a in it.alts]
            w, t = sum(x for x, _ in subs), sum(y + 2 * x for x, y in subs)
            ways, steps = ways * w, steps * w + t * ways
        elif isinstance(it, _Atom):
            steps += 2 * ways
        elif isinstance(it, _Repeat):
            if it.hi == it.lo:
                each = 2 * it.lo + 1
            else:
                each = 2 * it.lo + 6 if it.hi is None else 12 * it.hi
            steps += ways * each
        ways, steps = min(ways, _CAP), min(steps, _CAP)
    return ways, steps


def _first(items: tuple[Any, ...]) -> tuple[list[_Atom], bool]:
    """The atoms that can match the first character of ``items``, and whether it can match
    the empty string."""
    out: list[_Atom] = []
    for it in items:
        if isinstance(it, _Atom):
            return [*out, it], False
        if isinstance(it, _Repeat):
            out.append(it.atom)
            if it.lo > 0:
                return out, False
        elif isinstance(it, _Group):
            atoms, empty = _first(it.items)
            out += atoms
            if not empty:
                return out, False
        elif isinstance(it, _Alt):
            empty = False
            for a in it.alts:
                atoms, e = _first(a)
                out += atoms
                empty = empty or e
            if not empty:
                return out, False
    return out, True


def _disjoint(x: _Atom, y: _Atom) -> bool:
    if x.finite is not None:
        return not any(y.matches(c) for c in x.finite)
    if y.finite is not None:
        return not any(x.matches(c) for c in y.finite)
    if x.category is not None and y.category is not None:
        return x.category[0] == y.category[0] and x.category[1] != y.category[1]
    return False  # both large sets: assume they overlap


def _check_splits(items: tuple[Any, ...], follow: list[_Atom]) -> list[_Repeat]:
    """Rule 2 for every variable quantifier in ``items`` (followed by ``follow``); returns the
    unbounded quantifiers for rule 3."""
    unbounded: list[_Repeat] = []
    for i, it in enumerate(items):
        nxt, empty = _first(items[i + 1 :])
        if empty:
            nxt = nxt + follow
        if isinstance(it, _Repeat):
            if it.hi is None:
                unbounded.append(it)
            if it.hi != it.lo and not it.possessive:
                clash = next((a for a in nxt if not _disjoint(it.atom, a)), None)
                if clash is not None:
                    raise _RejectError(
                        f"the quantifier {it.text} on {_show_atom(it.atom)} is followed by "
                        f"{_show_atom(clash)}, which can match the same character: backtracking "
                        f"would try every split between them; follow it with a character it "
                        f"cannot match (e.g. \\d+\\.)"
                    )
        elif isinstance(it, _Group):
            unbounded += _check_splits(it.items, nxt)
        elif isinstance(it, _Alt):
            for a in it.alts:
                unbounded += _check_splits(a, nxt)
    return unbounded


def _leads(items: tuple[Any, ...], acc: tuple[_Atom, ...]) -> list[tuple[bool, tuple[_Atom, ...]]]:
    """Every way through the fixed leading part of ``items``: (anchored, its mandatory atoms)."""
    for i, it in enumerate(items):
        if isinstance(it, _Anchor):
            if it.start:
                return [(True, acc)]
        elif isinstance(it, _Atom):
            acc = (*acc, it)
        elif isinstance(it, _Repeat):
            if it.lo > 0:
                acc = (*acc, it.atom)
            if it.lo != it.hi:
                return [(False, acc)]
        elif isinstance(it, _Group):
            return _leads(it.items + items[i + 1 :], acc)
        elif isinstance(it, _Alt):
            return [lead for a in it.alts for lead in _leads(a + items[i + 1 :], acc)]
    return [(False, acc)]


def _show_atom(a: _Atom) -> str:
    return repr(a.text) if len(a.text) == 1 else a.text


# ---------------------------------------------------------------------------------- entry


class _Checked(NamedTuple):
    rx: re.Pattern[str]
    cost: int


@functools.lru_cache(maxsize=1024)
def _compile(pattern: str) -> _Checked | str:
    """The compiled pattern and its cost, or why it is refused (cached: specs are made often)."""
    if len(pattern) > MAX_PATTERN_CHARS:
        return f"it has {len(pattern)} characters, more than the {MAX_PATTERN_CHARS} allowed"
    try:
        rx = re.compile(pattern)
        parsed = _sre.parse(pattern)
    except (re.error, OverflowError, RecursionError, ValueError) as e:
        return f"it is not a valid regular expression ({e})"
    if rx.groups < 1:
        return "it has no group for the id (group 1 must capture the expert id)"
    flags = parsed.state.flags
    try:
        if flags & re.IGNORECASE:
            raise _RejectError(_NO_IGNORECASE)
        items = _build(parsed, flags)
        unbounded = _check_splits(items, [])
        leads = _leads(items, ())
        for anchored, atoms in leads if unbounded else []:
            for q in unbounded:
                if not anchored and all(not _disjoint(q.atom, a) for a in atoms):
                    raise _RejectError(
                        f"the quantifier {q.text} on {_show_atom(q.atom)} can match every "
                        f"character the pattern starts with, so a search would restart inside "
                        f"its run and rescan it (quadratic time): start the pattern with a "
                        f"literal it cannot match (e.g. experts\\.(\\d+)) or anchor it with ^"
                    )
        # Per character of a key, a search pays at most about one attempt's steps: an attempt
        # at each start, or (anchored or not) a retry of the rest at each character a guarded
        # repeat gives back, which fails within those steps.
        _, steps = _work(items)
        if _START + steps > MAX_COST:
            raise _RejectError(
                f"a match attempt may cost {'more than ' * (steps >= _CAP)}{steps} steps, more "
                f"than the {MAX_COST - _START} allowed (alternatives multiply it, {{m,n}} counts "
                f"add to it)"
            )
        cost = _START + steps
    except _RejectError as e:
        return str(e)
    except RecursionError:  # pragma: no cover - nesting is bounded by MAX_PATTERN_CHARS
        return "it nests too deeply"
    return _Checked(rx, cost)


def _checked(pattern: Any) -> _Checked:
    if not isinstance(pattern, str):
        raise SpecError(f"ZeroSpec.experts: a pattern must be a str, got {type(pattern).__name__}")
    got = _compile(pattern)
    if isinstance(got, str):
        shown = repr(pattern) if len(pattern) <= 80 else repr(pattern[:77]) + "..."
        raise SpecError(f"ZeroSpec.experts: pattern {shown} is not allowed: {got}")
    return got


def compile_expert_pattern(pattern: Any) -> re.Pattern[str]:
    r"""Check one expert pattern against the linear-time rule (module docstring); compile it.

    Raises:
        SpecError: the pattern is not a str, does not compile, or uses a construct the rule
            does not allow (the message names it and why).

    Example:
        >>> compile_expert_pattern(r"experts\.(\d+)\.").search("moe.experts.3.w1").group(1)
        '3'
        >>> compile_expert_pattern(r"(a+)+$")
        Traceback (most recent call last):
        ...
        zckpt.errors.SpecError: ZeroSpec.experts: pattern '(a+)+$' is not allowed: ...
    """
    return _checked(pattern).rx


def compile_expert_patterns(patterns: tuple[Any, ...]) -> tuple[re.Pattern[str], ...]:
    r"""Check a spec's expert patterns, one by one and together (their costs add up, since
    every pattern is searched in every key); compile them.

    Raises:
        SpecError: a refused pattern, more than :data:`MAX_PATTERNS` patterns, or patterns
            whose costs together exceed :data:`MAX_COST`.

    Example:
        >>> [rx.pattern for rx in compile_expert_patterns((r"experts\.(\d+)\.",))]
        ['experts\\.(\\d+)\\.']
    """
    if len(patterns) > MAX_PATTERNS:
        raise SpecError(
            f"ZeroSpec.experts: {len(patterns)} patterns, more than the {MAX_PATTERNS} allowed"
        )
    checked = [_checked(p) for p in patterns]
    total = sum(c.cost for c in checked)
    if total > MAX_COST:
        raise SpecError(
            f"ZeroSpec.experts: the patterns together cost {total} steps per character of a key, "
            f"more than the {MAX_COST} allowed; use fewer or simpler patterns"
        )
    return tuple(c.rx for c in checked)

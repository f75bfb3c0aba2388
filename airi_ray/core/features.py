"""Real-time features: view declarations, event validation and windowed aggregations.

A ``FeatureView`` names an entity key (``user_id``), the event timestamp field, the typed
event fields, derived fields (``transforms``: small arithmetic expressions over the event
fields) and ``Aggregation``s: count, sum, mean, min, max or last of one field over a window
of event time (5 minutes, 1 hour, 1 day, or ``math.inf`` for every retained event).

Windows are half-open on the left: a lookup as of ``t`` aggregates the events with
``t - window_s < ts <= t``. An event exactly ``window_s`` old is out; an event at ``t`` is in;
an event after ``t`` is never seen, so a lookup as of a past time is point-in-time correct
(what a model would have seen then, given the events known now). ``last`` is the value of
the latest event in the window; events with equal timestamps count in arrival order.

Events are validated before anything is stored (``validate_batch`` checks a whole batch and
names every bad event), then kept per entity in time order (``FeatureIndex``): an in-order
event is an append, an out-of-order one a bisect and insert. A lookup bisects each window's
start and reads the slice with the builtin ``len``/``sum``/``min``/``max``, which keeps 100
entities with 1,000 events each in the low milliseconds without prefix sums.

Tenants: a view with no ``tenants`` keeps each tenant's events apart (``view_scope`` gives
the tenant as the scope: tenant A's customer 7 is not tenant B's); a view with ``tenants``
globs is shared by the tenants they match, and refuses the others (``PermissionDenied``).
An event may carry an ``event_id``: the index remembers the ids of the events it holds,
and ``FeatureIndex.fresh`` leaves out an event whose id it holds already (a retried push),
so the memory for ids is bounded like the events themselves.

Retention: ``expire(now)`` drops events with ``ts <= now - (longest window + ttl_s)``, so a
lookup older than ``ttl_s`` may miss them; ``max_events_per_entity`` keeps only the latest
events of each entity (by time, then arrival). The clock is an argument everywhere; the
storage layer (``airi_ray.data.features``) does the I/O around this module.
"""

from __future__ import annotations

import ast
import keyword
import math
import re
from bisect import bisect_right
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from types import CodeType, MappingProxyType
from typing import Any, Literal, get_args

from airi_ray.core.errors import InvalidRequest
from airi_ray.core.policy import PermissionDenied, allows

__all__ = [
    "AggFn",
    "Aggregation",
    "FeatureIndex",
    "FeatureView",
    "FieldType",
    "NormalisedEvent",
    "Value",
    "entity_id",
    "validate_batch",
    "validate_event",
    "view_scope",
]

FieldType = Literal["float", "int", "str", "bool"]
AggFn = Literal["count", "sum", "mean", "min", "max", "last"]
Value = float | int | str | bool

FIELD_TYPES: tuple[FieldType, ...] = get_args(FieldType)
AGG_FNS: tuple[AggFn, ...] = get_args(AggFn)
_NUMERIC_FNS = frozenset({"sum", "mean", "min", "max"})

_VIEW_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_MAX_EXPRESSION_CHARS = 500
_MAX_ERRORS_SHOWN = 5
EVENT_ID = "event_id"  # the optional key of an event that names it, for retried pushes
MAX_EVENT_ID_CHARS = 256
SHARED = ""  # the scope of a shared view's events (a tenant's name is never empty)

# The whole transform language. No attribute access, subscripts, power (9**9**9 is a
# denial of service) or string arithmetic ("a" * 10**9 likewise): strings may only be
# compared. What passes this check is compiled and run with no builtins but these.
_FUNCS: dict[str, Any] = {"abs": abs, "min": min, "max": max, "log1p": math.log1p}
_ALLOWED_NODES = (
    ast.Expression,
    ast.BinOp,
    ast.UnaryOp,
    ast.BoolOp,
    ast.Compare,
    ast.IfExp,
    ast.Call,
    ast.Name,
    ast.Constant,
    ast.Load,
    ast.Add,
    ast.Sub,
    ast.Mult,
    ast.Div,
    ast.FloorDiv,
    ast.Mod,
    ast.USub,
    ast.UAdd,
    ast.Not,
    ast.And,
    ast.Or,
    ast.Eq,
    ast.NotEq,
    ast.Lt,
    ast.LtE,
    ast.Gt,
    ast.GtE,
)


@dataclass(frozen=True)
class Aggregation:
    """One feature: ``fn`` of ``field`` over the events of the last ``window_s`` seconds.

    ``field`` is an event field, a transform, or the entity key (useful for ``count``).
    ``window_s`` may be ``math.inf``: every retained event.

    Raises:
        InvalidRequest: an unknown ``fn`` or a window that is not positive.
    """

    name: str
    field: str
    fn: AggFn
    window_s: float

    def __post_init__(self) -> None:
        if not self.name:
            raise InvalidRequest("an aggregation needs a non-empty name")
        if self.fn not in AGG_FNS:
            raise InvalidRequest(
                f"aggregation {self.name!r}: fn must be one of {', '.join(AGG_FNS)}; "
                f"got {self.fn!r}"
            )
        if not self.window_s > 0:  # also rejects NaN
            raise InvalidRequest(
                f"aggregation {self.name!r}: window_s must be a positive number of seconds "
                f"(or math.inf), got {self.window_s!r}"
            )


@dataclass(frozen=True)
class FeatureView:
    """A declared feature view (from the app spec).

    Attributes:
        name: letters, digits and ``_``, starting with a letter (it names a table).
        entity_key: the event field holding the entity id (a string or an integer).
        timestamp_field: the event field holding the event time (seconds since the epoch
            or an ISO-8601 time with a timezone).
        fields: every other event field and its type; all are required in each event.
        transforms: derived fields, in order, each an expression over the fields and the
            transforms before it (arithmetic, comparisons, ``and``/``or``/``not``,
            ``x if c else y``, numbers, quoted strings compared to string fields, and
            ``abs``, ``min``, ``max``, ``log1p``); e.g. ``{"big": "amount > 100"}``.
        aggregations: the features a lookup returns, in this order.
        ttl_s: how long past the longest window events are kept (for lookups as of a
            past time); older ones are dropped by ``FeatureIndex.expire``.
        max_events_per_entity: only the latest this many events per entity are kept.
        max_skew_s: how far past ``now`` an event time may be (clock skew).
        tenants: glob patterns of the tenants that share the view; empty (the default):
            every tenant has its own events (and reads only those).

    Raises:
        InvalidRequest: a name is malformed or clashes, a type or function is unknown, a
            transform uses something outside the whitelist, or an aggregation's field
            does not exist or is a string under sum/mean/min/max.
    """

    name: str
    entity_key: str
    fields: Mapping[str, FieldType]
    aggregations: Sequence[Aggregation]
    timestamp_field: str = "ts"
    transforms: Mapping[str, str] = field(default_factory=dict)
    ttl_s: float = 86_400.0
    max_events_per_entity: int = 100_000
    max_skew_s: float = 60.0
    tenants: Sequence[str] = ()
    # The transforms, checked and compiled: (name, code) in evaluation order.
    compiled: tuple[tuple[str, CodeType], ...] = field(
        init=False, repr=False, compare=False, default=()
    )

    def __post_init__(self) -> None:
        where = f"feature view {self.name!r}"
        if not isinstance(self.name, str) or not _VIEW_NAME_RE.match(self.name):
            raise InvalidRequest(
                f"{where}: the name must be 1-64 letters, digits or '_', starting with a letter"
            )
        if not self.entity_key or not self.timestamp_field:
            raise InvalidRequest(f"{where}: entity_key and timestamp_field must be non-empty")
        if self.entity_key == self.timestamp_field:
            raise InvalidRequest(
                f"{where}: entity_key and timestamp_field must differ, both are {self.entity_key!r}"
            )
        taken = {self.entity_key, self.timestamp_field}
        for name, ftype in self.fields.items():
            _check_field_name(where, "field", name, taken)
            if ftype not in FIELD_TYPES:
                raise InvalidRequest(
                    f"{where}: field {name!r} has type {ftype!r}; allowed: {', '.join(FIELD_TYPES)}"
                )
            taken.add(name)
        str_fields = {n for n, t in self.fields.items() if t == "str"}
        known = set(self.fields)
        compiled = []
        for name, expression in self.transforms.items():
            _check_field_name(where, "transform", name, taken)
            code = _compile_transform(f"{where}, transform {name!r}", expression, known, str_fields)
            compiled.append((name, code))
            known.add(name)
            taken.add(name)
        if not self.aggregations:
            raise InvalidRequest(f"{where}: declare at least one aggregation")
        seen: set[str] = set()
        for agg in self.aggregations:
            if agg.name in seen:
                raise InvalidRequest(f"{where}: two aggregations are named {agg.name!r}")
            seen.add(agg.name)
            if agg.field not in known and agg.field != self.entity_key:
                raise InvalidRequest(
                    f"{where}, aggregation {agg.name!r}: unknown field {agg.field!r}; "
                    f"allowed: {', '.join([self.entity_key, *sorted(known)])}"
                )
            if agg.fn in _NUMERIC_FNS and (agg.field in str_fields or agg.field == self.entity_key):
                raise InvalidRequest(
                    f"{where}, aggregation {agg.name!r}: {agg.fn} needs a numeric field, "
                    f"{agg.field!r} holds strings; use count or last"
                )
        if not self.ttl_s >= 0:
            raise InvalidRequest(f"{where}: ttl_s must be >= 0, got {self.ttl_s!r}")
        if not self.max_skew_s >= 0:
            raise InvalidRequest(f"{where}: max_skew_s must be >= 0, got {self.max_skew_s!r}")
        if self.max_events_per_entity < 1:
            raise InvalidRequest(
                f"{where}: max_events_per_entity must be at least 1, "
                f"got {self.max_events_per_entity}"
            )
        if isinstance(self.tenants, str) or not all(
            isinstance(t, str) and t.strip() for t in self.tenants
        ):
            raise InvalidRequest(
                f"{where}: tenants must be a list of tenant names or glob patterns "
                f"(e.g. ['tenant-a', 'team-*']), got {self.tenants!r}"
            )
        object.__setattr__(self, "tenants", tuple(self.tenants))
        # Private copies, so the checked declaration cannot change under the index.
        object.__setattr__(self, "fields", MappingProxyType(dict(self.fields)))
        object.__setattr__(self, "transforms", MappingProxyType(dict(self.transforms)))
        object.__setattr__(self, "aggregations", tuple(self.aggregations))
        object.__setattr__(self, "compiled", tuple(compiled))

    @property
    def horizon_s(self) -> float:
        """Events older than this (relative to now) are dropped: longest window + ttl."""
        return max(a.window_s for a in self.aggregations) + self.ttl_s

    def empty_features(self) -> dict[str, Value | None]:
        """The features of an entity with no events: count and sum 0, the others None."""
        return {a.name: (0 if a.fn in ("count", "sum") else None) for a in self.aggregations}


def view_scope(view: FeatureView, tenant: str) -> str:
    """Whose events ``tenant`` pushes and reads in ``view``: its own (the tenant's name),
    or, in a view shared by ``tenants`` globs that match it, everyone's (``SHARED``).

    Raises:
        PermissionDenied: the view is shared by other tenants only.
    """
    if not view.tenants:
        return tenant
    if allows(view.tenants, tenant):
        return SHARED
    raise PermissionDenied(
        f"tenant {tenant!r} may not use feature view {view.name!r}: it is shared by the "
        f"tenants matching {', '.join(view.tenants)} only",
        code="feature_view_not_allowed",
        rule="feature_acl",
    )


def _check_field_name(where: str, kind: str, name: str, taken: set[str]) -> None:
    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
        raise InvalidRequest(f"{where}: {kind} name {name!r} must be a Python-style identifier")
    if name.startswith("_") or name in _FUNCS or name == EVENT_ID:
        raise InvalidRequest(
            f"{where}: {kind} name {name!r} is reserved (names starting with '_', "
            f"{EVENT_ID!r} and {', '.join(_FUNCS)})"
        )
    if name in taken:
        raise InvalidRequest(f"{where}: {kind} name {name!r} is used twice")


def _compile_transform(
    where: str, expression: str, known: set[str], str_fields: set[str]
) -> CodeType:
    """Check ``expression`` against the whitelist and compile it."""
    if not isinstance(expression, str) or len(expression) > _MAX_EXPRESSION_CHARS:
        raise InvalidRequest(
            f"{where}: the expression must be a string of at most {_MAX_EXPRESSION_CHARS} chars"
        )
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError as e:
        raise InvalidRequest(f"{where}: {expression!r} is not an expression ({e.msg})") from None
    allowed = "arithmetic (+ - * / // %), comparisons, and/or/not, x if c else y, " + ", ".join(
        _FUNCS
    )
    nodes = list(ast.walk(tree))
    # Strings may only be compared, so they are allowed as the direct operands of a Compare.
    compared = {id(c.left) for c in nodes if isinstance(c, ast.Compare)}
    compared |= {id(n) for c in nodes if isinstance(c, ast.Compare) for n in c.comparators}
    called = {id(c.func) for c in nodes if isinstance(c, ast.Call)}
    for node in nodes:
        if not isinstance(node, _ALLOWED_NODES):
            raise InvalidRequest(
                f"{where}: {type(node).__name__} is not allowed in {expression!r}; "
                f"allowed: {allowed}"
            )
        if isinstance(node, ast.Call):
            if not (isinstance(node.func, ast.Name) and node.func.id in _FUNCS) or node.keywords:
                raise InvalidRequest(
                    f"{where}: only {', '.join(_FUNCS)} may be called, with plain arguments, "
                    f"in {expression!r}"
                )
        elif isinstance(node, ast.Name) and id(node) not in called:
            if node.id not in known:
                raise InvalidRequest(
                    f"{where}: unknown name {node.id!r} in {expression!r}; allowed: the fields "
                    f"and earlier transforms ({', '.join(sorted(known)) or 'none'})"
                )
            if node.id in str_fields and id(node) not in compared:
                raise InvalidRequest(
                    f"{where}: string field {node.id!r} may only be compared (==, !=, <, ...) "
                    f"in {expression!r}"
                )
        elif isinstance(node, ast.Constant):
            is_number = isinstance(node.value, int | float)
            if not (is_number or (isinstance(node.value, str) and id(node) in compared)):
                raise InvalidRequest(
                    f"{where}: constant {node.value!r} is not allowed in {expression!r}; "
                    "allowed: numbers, True/False, and strings compared to string fields"
                )
    return compile(tree, f"<transform {where}>", "eval")


# -- events -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NormalisedEvent:
    """A validated event: entity id as a string, time in epoch seconds, and the field
    values (each declared field in its type, then each transform's result)."""

    entity: str
    ts: float
    values: Mapping[str, Value]
    event_id: str | None = None  # what names it across retried pushes


def entity_id(value: object) -> str:
    """The canonical entity id: strings as they are, integers in decimal ("42" == 42).

    Raises:
        InvalidRequest: not a non-empty string or an integer.
    """
    if isinstance(value, str) and value:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise InvalidRequest(
        f"an entity id must be a non-empty string or an integer, got {_show(value)}"
    )


def validate_event(view: FeatureView, event: object, now: float, index: int = 0) -> NormalisedEvent:
    """Check one event against ``view`` and normalise it.

    Args:
        event: a mapping of field name to value.
        now: the current time, for the clock-skew check.
        index: the event's position in its batch, for the messages ("event 3: ...").

    Raises:
        InvalidRequest: not a mapping, a missing entity key, timestamp or field, an
            unknown field, a value of the wrong type, a timestamp that is malformed or more
            than ``view.max_skew_s`` after ``now``, or a transform that fails.
    """
    at = f"event {index}"
    if not isinstance(event, Mapping):
        raise InvalidRequest(f"{at}: must be an object of field to value, got {_show(event)}")
    if view.entity_key not in event:
        raise InvalidRequest(f"{at}: missing entity key {view.entity_key!r}")
    try:
        entity = entity_id(event[view.entity_key])
    except InvalidRequest as e:
        raise InvalidRequest(f"{at}: {view.entity_key!r}: {e.message}") from None
    if view.timestamp_field not in event:
        raise InvalidRequest(f"{at}: missing timestamp {view.timestamp_field!r}")
    ts = _timestamp(at, view.timestamp_field, event[view.timestamp_field])
    if ts > now + view.max_skew_s:
        raise InvalidRequest(
            f"{at}: {view.timestamp_field!r} {ts!r} is {ts - now:.3f} s in the future; "
            f"allowed: at most {view.max_skew_s:g} s after now ({now!r})"
        )
    event_id = None
    if EVENT_ID in event:
        event_id = event[EVENT_ID]
        if isinstance(event_id, int) and not isinstance(event_id, bool):
            event_id = str(event_id)
        if not (isinstance(event_id, str) and 0 < len(event_id) <= MAX_EVENT_ID_CHARS):
            raise InvalidRequest(
                f"{at}: {EVENT_ID!r} must be a string of 1 to {MAX_EVENT_ID_CHARS} characters "
                f"or an integer, the same when the push is retried; got {_show(event_id)}"
            )
    # An event with exactly as many keys as declared has no unknown one once the missing
    # checks pass; counting first spares the scan on the usual path.
    if len(event) != len(view.fields) + 2 + (event_id is not None):
        unknown = [
            k for k in event if k not in view.fields and k not in _keys(view) and k != EVENT_ID
        ]
        if unknown:
            raise InvalidRequest(
                f"{at}: unknown field {unknown[0]!r}; view {view.name!r} accepts "
                f"{', '.join([*_keys(view), *view.fields])} (and an optional {EVENT_ID!r})"
            )
    values: dict[str, Value] = {}
    for name, ftype in view.fields.items():
        if name not in event:
            raise InvalidRequest(
                f"{at}: missing field {name!r} ({ftype}); every event needs "
                f"{', '.join([*_keys(view), *view.fields])}"
            )
        values[name] = _typed(at, name, ftype, event[name])
    for name, code in view.compiled:
        values[name] = _derive(at, view, name, code, values)
    return NormalisedEvent(entity, ts, values, event_id)


def validate_batch(
    view: FeatureView, events: Iterable[object], now: float
) -> list[NormalisedEvent]:
    """Validate every event of a batch; the batch is accepted whole or not at all.

    Raises:
        InvalidRequest: at least one event is invalid; the message counts the bad events
            and shows the first few.
    """
    good: list[NormalisedEvent] = []
    shown: list[str] = []
    bad = total = 0
    for i, event in enumerate(events):
        total += 1
        try:
            good.append(validate_event(view, event, now, i))
        except InvalidRequest as e:
            bad += 1
            if len(shown) < _MAX_ERRORS_SHOWN:
                shown.append(e.message)
    if bad:
        more = f"; and {bad - len(shown)} more" if bad > len(shown) else ""
        raise InvalidRequest(
            f"{bad} of {total} events for view {view.name!r} are invalid and the batch was "
            f"rejected as a whole: {'; '.join(shown)}{more}"
        )
    return good


def _keys(view: FeatureView) -> tuple[str, str]:
    return (view.entity_key, view.timestamp_field)


def _show(value: object) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


def _timestamp(at: str, name: str, value: object) -> float:
    """Epoch seconds from a finite number, an ISO-8601 string or an aware datetime."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        if math.isfinite(value):
            return float(value)
    elif isinstance(value, str | datetime):
        try:
            when = datetime.fromisoformat(value) if isinstance(value, str) else value
        except ValueError:
            pass
        else:
            if when.tzinfo is not None:
                return when.timestamp()
            raise InvalidRequest(
                f"{at}: {name!r} {_show(value)} has no timezone; add one "
                "(e.g. 2024-05-01T12:00:00Z or +02:00) so the time is unambiguous"
            )
    raise InvalidRequest(
        f"{at}: {name!r} must be a number of seconds or an ISO-8601 time, got {_show(value)}"
    )


def _typed(at: str, name: str, ftype: FieldType, value: object) -> Value:
    if ftype == "float":
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    elif ftype == "int":
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # JSON writers may send 3.0 for 3
        if isinstance(value, int) and not isinstance(value, bool):
            if _INT64_MIN <= value <= _INT64_MAX:
                return value
            raise InvalidRequest(f"{at}: {name!r} {value} does not fit in 64 bits")
    elif ftype == "str":
        if isinstance(value, str):
            return value
    elif isinstance(value, bool):
        return value
    allowed = {
        "float": "a finite number",
        "int": "an integer",
        "str": "a string",
        "bool": "true or false",
    }[ftype]
    raise InvalidRequest(f"{at}: {name!r} must be {allowed} ({ftype}), got {_show(value)}")


def _derive(
    at: str, view: FeatureView, name: str, code: CodeType, values: dict[str, Value]
) -> Value:
    expression = view.transforms[name]
    try:
        result = eval(code, {"__builtins__": {}, **_FUNCS}, values)  # whitelisted AST only
    except (ArithmeticError, ValueError, TypeError) as e:
        raise InvalidRequest(
            f"{at}: transform {name!r} = {expression!r} failed on this event: {e}"
        ) from None
    if isinstance(result, bool) or (isinstance(result, int) and _INT64_MIN <= result <= _INT64_MAX):
        return result
    if isinstance(result, float) and math.isfinite(result):
        return result
    raise InvalidRequest(
        f"{at}: transform {name!r} = {expression!r} gave {_show(result)}; allowed: a finite "
        "number or a bool"
    )


# -- the in-memory index --------------------------------------------------------------------


@dataclass(slots=True)
class _Series:
    """One entity's retained events: times sorted, one column per aggregated field."""

    ts: list[float]
    columns: dict[str, list[Any]]
    ids: list[str | None]  # each event's id, if it has one


class FeatureIndex:
    """The events of one view per entity, in time order, and the lookups over them.

    Not thread-safe: one owner (an actor) calls it.
    """

    def __init__(self, view: FeatureView) -> None:
        self.view = view
        self._series: dict[str, _Series] = {}
        # Only the fields some aggregation reads are kept in memory.
        self._kept = tuple(dict.fromkeys(a.field for a in view.aggregations))
        # Lookup plan: per window, per field, the (name, fn) to compute from one slice.
        plan: dict[float, dict[str, list[tuple[str, str]]]] = {}
        for a in view.aggregations:
            plan.setdefault(a.window_s, {}).setdefault(a.field, []).append((a.name, a.fn))
        self._plan = [
            (w, [(f, tuple(aggs)) for f, aggs in by_field.items()]) for w, by_field in plan.items()
        ]
        # entity -> time before which the cap dropped its events (for the store's cleanup)
        self._evicted: dict[str, float] = {}
        self._ids: set[str] = set()  # the ids of the events held, for retried pushes
        self.events = 0

    def __len__(self) -> int:
        """Number of entities with retained events."""
        return len(self._series)

    def fresh(self, events: Iterable[NormalisedEvent]) -> list[NormalisedEvent]:
        """``events`` without those already held (an event with the id of one held) and
        without repeats of an id within them: what a retried push adds anew. An id is
        remembered while its event is held (until it expires or the cap drops it)."""
        seen: set[str] = set()
        out = []
        for e in events:
            if e.event_id is not None:
                if e.event_id in self._ids or e.event_id in seen:
                    continue
                seen.add(e.event_id)
            out.append(e)
        return out

    def add(self, events: Iterable[NormalisedEvent]) -> None:
        """Add validated events, in arrival order (equal times keep that order).

        An entity past ``max_events_per_entity`` loses its oldest event (which may be the
        new one, if it is older than all it kept).
        """
        cap = self.view.max_events_per_entity
        for e in events:
            s = self._series.get(e.entity)
            if s is None:
                s = self._series[e.entity] = _Series([], {f: [] for f in self._kept}, [])
            row = [e.entity if f == self.view.entity_key else e.values[f] for f in self._kept]
            if not s.ts or e.ts >= s.ts[-1]:  # the usual case: events arrive in time order
                s.ts.append(e.ts)
                s.ids.append(e.event_id)
                for column, v in zip(s.columns.values(), row, strict=True):
                    column.append(v)
            else:
                i = bisect_right(s.ts, e.ts)  # after equal times: arrival order
                s.ts.insert(i, e.ts)
                s.ids.insert(i, e.event_id)
                for column, v in zip(s.columns.values(), row, strict=True):
                    column.insert(i, v)
            if e.event_id is not None:
                self._ids.add(e.event_id)
            self.events += 1
            if len(s.ts) > cap:
                self._drop_before(s, 1)
                self.events -= 1
                self._evicted[e.entity] = s.ts[0]

    def features(self, entity: object, as_of: float) -> dict[str, Value | None]:
        """Every aggregation of ``entity`` over the events with ``as_of - window < ts <= as_of``.

        An unknown entity (or one with no events in a window) gets count and sum 0 and
        None for mean, min, max and last.
        """
        out = self.view.empty_features()
        s = self._series.get(entity if isinstance(entity, str) else entity_id(entity))
        if s is None:
            return out
        ts = s.ts
        hi = len(ts) if as_of >= ts[-1] else bisect_right(ts, as_of)
        for window, fields in self._plan:
            lo = bisect_right(ts, as_of - window, 0, hi)
            if lo == hi:
                continue
            for f, aggs in fields:
                values = s.columns[f][lo:hi]
                for name, fn in aggs:
                    if fn == "count":
                        out[name] = len(values)
                    elif fn == "sum":
                        out[name] = sum(values)
                    elif fn == "mean":
                        out[name] = sum(values) / len(values)
                    elif fn == "min":
                        out[name] = min(values)
                    elif fn == "max":
                        out[name] = max(values)
                    else:  # last
                        out[name] = values[-1]
        return out

    def expire(self, now: float) -> int:
        """Drop the events with ``ts <= now - view.horizon_s``; returns how many."""
        horizon = now - self.view.horizon_s
        dropped = 0
        for entity in list(self._series):
            s = self._series[entity]
            n = bisect_right(s.ts, horizon)
            if n == len(s.ts):
                self._ids.difference_update(i for i in s.ids if i is not None)
                del self._series[entity]
                self._evicted.pop(entity, None)
            elif n:
                self._drop_before(s, n)
            dropped += n
        self.events -= dropped
        return dropped

    def take_evicted(self) -> dict[str, float]:
        """Entities whose oldest events the cap dropped since the last call, each with the
        time before which none of its events are kept; clears the record."""
        evicted, self._evicted = self._evicted, {}
        return evicted

    def _drop_before(self, s: _Series, n: int) -> None:
        """Drop the ``n`` oldest events of a series, and forget their ids."""
        self._ids.difference_update(i for i in s.ids[:n] if i is not None)
        del s.ts[:n]
        del s.ids[:n]
        for column in s.columns.values():
            del column[:n]

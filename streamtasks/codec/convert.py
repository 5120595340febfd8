"""Task arguments: plain data on the wire, typed values in the task function.

The sender turns dataclasses and pydantic models into plain data (:func:`to_plain`) and
checks that the arguments fit the task's signature (:func:`check_arguments`); the worker
binds them and rebuilds typed values from the parameters' type hints
(:func:`bind_arguments`).
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import inspect
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from datetime import date, datetime, timedelta
from decimal import Decimal
from enum import Enum
from typing import Any
from uuid import UUID

from streamtasks.codec._paths import (
    NOT_AN_OBJECT,
    PathFailure,
    bad_key,
    map_items,
    object_to_mapping,
    type_name,
    unsupported,
)
from streamtasks.errors import ArgumentError, EncodeError

# Types the codec carries as they are: to_plain leaves them alone.
_LEAF_TYPES = frozenset(
    {type(None), bool, int, float, str, bytes, datetime, date, timedelta, Decimal, UUID}
)


def to_plain(value: Any, path: str = "value") -> Any:
    """Return ``value`` as plain data the codec can carry.

    Dataclass instances become dicts of their fields and pydantic v2 models
    ``model_dump(mode="python")``, both recursively; enums become their value; tuples
    become lists; everything the codec carries as is (None, bool, int, float, str, bytes,
    datetime, date, timedelta, Decimal, UUID) is left alone. A list or dict holding only
    such values is returned itself, not copied.

    Args:
        value: the value to convert.
        path: how to name ``value`` in an error (``"args[0]"``, ``"kwargs['x']"``).

    Returns:
        The plain value.

    Raises:
        EncodeError: an unsupported type (a set, an arbitrary object) or a non-str dict
            key, naming the path and the type.

    """
    try:
        return _plain(value)
    except PathFailure as failure:
        raise failure.to_encode_error(path) from None
    except RecursionError as err:
        raise EncodeError(f"{path}: nested too deeply or contains itself") from err


def _plain(value: Any) -> Any:
    kind = type(value)
    if kind in _LEAF_TYPES:
        return value
    if kind is list or kind is tuple:
        if kind is list and set(map(type, value)) <= _LEAF_TYPES:
            return value
        return map_items(_plain, value)
    if isinstance(value, Mapping):
        return _plain_mapping(value)
    if isinstance(value, Enum):
        return _plain(value.value)
    if isinstance(value, bool | int | float | str | bytes | bytearray | date | timedelta):
        return value  # subclasses and bytearray: the encoder takes them
    if isinstance(value, Decimal | UUID):
        return value
    if isinstance(value, list | tuple):
        return _plain(list(value))
    converted = object_to_mapping(value)
    if converted is NOT_AN_OBJECT:
        raise unsupported(value)
    return _plain(converted)


def _plain_mapping(value: Mapping[Any, Any]) -> dict[str, Any]:
    if type(value) is dict and set(map(type, value.values())) <= _LEAF_TYPES:
        for key in value:
            if not isinstance(key, str):
                raise bad_key(key)
        return value
    out: dict[str, Any] = {}
    for key, item in value.items():
        if not isinstance(key, str):
            raise bad_key(key)
        try:
            out[key] = _plain(item)
        except PathFailure as failure:
            failure.add_key(key)
            raise
    return out


# ---------------------------------------------------------------------------------------
# Signatures and type hints


def check_arguments(fn: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
    """Check that ``args`` and ``kwargs`` bind to ``fn``'s signature (at send time).

    Only the binding is checked (missing, unexpected or duplicated arguments), not the
    types: those are checked by :func:`bind_arguments` on the worker.

    Args:
        fn: the task function.
        args: positional arguments.
        kwargs: keyword arguments.

    Raises:
        ArgumentError: they do not bind, e.g. ``"sum(): missing a required argument:
            'numbers'"``.

    """
    plan = _plan(fn)
    if not _by_position(plan, args, kwargs):
        _bind(plan, args, kwargs)


def bind_arguments(
    fn: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any]
) -> tuple[list[Any], dict[str, Any]]:
    """Bind arguments to ``fn``'s signature and convert them by its type hints (at the worker).

    For each annotated parameter: a dict becomes the hinted dataclass (fields converted
    by their own hints) or pydantic model (``model_validate``); ``list[X]``, ``tuple[...]``,
    ``set[X]``, ``dict[str, X]``, ``X | None`` and other unions are converted recursively;
    enums are built from their value; scalars (int but not bool, float or int, str, bytes,
    bool, Decimal, UUID, datetime, date, timedelta, any other class) are checked, not
    converted. Unannotated and ``Any`` parameters are passed unchanged.

    Cost: the hint analysis is cached per function. Lists and dicts of scalars are checked
    element by element but in one C-level pass over the element types (``set(map(type,
    items))``, about 20 ms for a million ints); lists of dataclasses or models convert
    each element in Python.

    Args:
        fn: the task function.
        args: positional arguments as decoded.
        kwargs: keyword arguments as decoded.

    Returns:
        ``(args, kwargs)`` ready for ``fn(*args, **kwargs)``, as
        :class:`inspect.BoundArguments` splits them: every argument that can be passed by
        position is in ``args`` (even if it was sent by keyword), ``kwargs`` holds the
        keyword-only ones and those collected by ``**kwargs``.

    Raises:
        ArgumentError: the arguments do not bind, or one does not fit its hint, e.g.
            ``"sum(): argument 'numbers' expects list[int], got str"``.

    """
    plan = _plan(fn)
    if _by_position(plan, args, kwargs):
        out = list(args)
        for index, name in enumerate(plan.kinds):
            rule = plan.rules.get(name)
            if rule is not None:
                out[index] = _apply_rule(plan, name, rule.apply, out[index])
        return out, {}
    bound = _bind(plan, args, kwargs)
    if bound is None:
        return list(args), dict(kwargs)
    for name, value in list(bound.arguments.items()):
        rule = plan.rules.get(name)
        if rule is None:
            continue
        kind = plan.kinds[name]
        if kind is inspect.Parameter.VAR_POSITIONAL:
            each = functools.partial(_apply_each, rule)
            bound.arguments[name] = tuple(_apply_rule(plan, name, each, value))
        elif kind is inspect.Parameter.VAR_KEYWORD:
            values = functools.partial(_apply_values, rule)
            bound.arguments[name] = _apply_rule(plan, name, values, value)
        else:
            bound.arguments[name] = _apply_rule(plan, name, rule.apply, value)
    return list(bound.args), dict(bound.kwargs)


def _by_position(plan: _Plan, args: Sequence[Any], kwargs: Mapping[str, Any]) -> bool:
    """Whether the arguments bind as they are: every parameter plain, each sent by position.

    Then binding needs no ``inspect`` (about 2 us per task for a task without parameters).
    """
    return plan.plain and not kwargs and len(args) == len(plan.kinds)


def _apply_rule(plan: _Plan, name: str, apply: Callable[[Any], Any], value: Any) -> Any:
    try:
        return apply(value)
    except PathFailure as failure:
        where = "".join(reversed(failure.segments))
        raise ArgumentError(
            f"{plan.name}(): argument {name!r}{where} {failure.problem}"
        ) from None


@dataclasses.dataclass(frozen=True, slots=True)
class _Plan:
    name: str
    signature: inspect.Signature | None
    rules: dict[str, _Rule]
    kinds: dict[str, inspect._ParameterKind]
    #: Every parameter is positional-or-keyword without a default (see _by_position).
    plain: bool = False


@functools.lru_cache(maxsize=4096)
def _plan(fn: Callable[..., Any]) -> _Plan:
    name = getattr(fn, "__name__", None) or type(fn).__name__
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have none: nothing to check
        return _Plan(name, None, {}, {})
    try:
        hints = typing.get_type_hints(fn)
    except Exception:
        hints = {}
    builder = _RuleBuilder()
    rules: dict[str, _Rule] = {}
    kinds: dict[str, inspect._ParameterKind] = {}
    for param in signature.parameters.values():
        kinds[param.name] = param.kind
        if param.name in hints:
            rule = builder.rule(hints[param.name])
            if rule is not None:
                rules[param.name] = rule
    plain = all(
        param.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
        and param.default is inspect.Parameter.empty
        for param in signature.parameters.values()
    )
    return _Plan(name, signature, rules, kinds, plain)


def _bind(
    plan: _Plan, args: Sequence[Any], kwargs: Mapping[str, Any]
) -> inspect.BoundArguments | None:
    if plan.signature is None:
        return None
    try:
        return plan.signature.bind(*args, **kwargs)
    except TypeError as err:
        raise ArgumentError(f"{plan.name}(): {err}") from None


def _apply_each(rule: _Rule, items: Sequence[Any]) -> list[Any]:
    if rule.accepts is not None:
        _check_types(rule, items)
        return items if type(items) is list else list(items)
    out = []
    for index, item in enumerate(items):
        try:
            out.append(rule.apply(item))
        except PathFailure as failure:
            failure.add_index(index)
            raise
    return out


def _apply_values(rule: _Rule, mapping: Mapping[str, Any]) -> dict[str, Any]:
    if rule.accepts is not None:
        _check_types(rule, mapping.values(), keys=list(mapping))
        return dict(mapping)
    out = {}
    for key, item in mapping.items():
        try:
            out[key] = rule.apply(item)
        except PathFailure as failure:
            failure.add_key(key)
            raise
    return out


def _check_types(rule: _Rule, items: Any, keys: list[str] | None = None) -> None:
    """Check every item's type against a scalar rule in one C-level pass."""
    accepts = rule.accepts
    assert accepts is not None
    if all(accepts(kind) for kind in set(map(type, items))):
        return
    for index, item in enumerate(items):  # cold: find the first culprit for the message
        if not accepts(type(item)):
            failure = _mismatch(rule.expected, item)
            if keys is None:
                failure.add_index(index)
            else:
                failure.add_key(keys[index])
            raise failure


def _mismatch(expected: str, value: Any, detail: str = "") -> PathFailure:
    return PathFailure(f"expects {expected}, got {type_name(value)}{detail}")


class _Rule:
    """How to check / convert one value for one hint.

    ``accepts`` is set for scalar hints: a predicate on the value's type, so containers
    can check all their items at once. ``convert`` does the rest (and is what ``apply``
    runs); for scalar rules it only checks.
    """

    __slots__ = ("accepts", "convert", "expected")

    def __init__(
        self,
        expected: str,
        convert: Callable[[Any], Any] | None = None,
        accepts: Callable[[type], bool] | None = None,
    ) -> None:
        self.expected = expected
        self.accepts = accepts
        self.convert = convert

    def apply(self, value: Any) -> Any:
        """Return ``value`` checked / converted; raises PathFailure on a mismatch."""
        if self.accepts is not None:
            if not self.accepts(type(value)):
                raise _mismatch(self.expected, value)
            return value
        assert self.convert is not None
        return self.convert(value)


def _scalar(expected: type, *, exclude_bool: bool = True, also: tuple[type, ...] = ()) -> _Rule:
    kinds = (expected, *also)

    def accepts(kind: type) -> bool:
        return issubclass(kind, kinds) and not (exclude_bool and kind is bool)

    return _Rule(expected.__qualname__, accepts=functools.lru_cache(maxsize=64)(accepts))


_SCALAR_RULES: dict[Any, _Rule] = {
    int: _scalar(int),
    float: _scalar(float, also=(int,)),
    bool: _Rule("bool", accepts=lambda kind: kind is bool),
    str: _scalar(str),
    bytes: _scalar(bytes, also=(bytearray,)),
    type(None): _Rule("None", accepts=lambda kind: kind is type(None)),
}


_SEQUENCE_ORIGINS = (
    list,
    set,
    frozenset,
    collections.abc.Sequence,
    collections.abc.MutableSequence,
    collections.abc.Collection,
    collections.abc.Iterable,
    collections.abc.Set,
    collections.abc.MutableSet,
)
_MAPPING_ORIGINS = (dict, collections.abc.Mapping, collections.abc.MutableMapping)


class _RuleBuilder:
    """Builds rules for hints; the memo lets self-referencing dataclasses terminate."""

    def __init__(self) -> None:
        self._memo: dict[Any, _Rule | None] = {}

    def rule(self, hint: Any) -> _Rule | None:
        """Return the rule for ``hint``, or None if values pass unchanged."""
        try:
            if hint in self._memo:
                return self._memo[hint]
        except TypeError:  # an unhashable hint (Literal of a list...): build uncached
            return self._build(hint)
        rule = self._build(hint)
        self._memo.setdefault(hint, rule)
        return self._memo[hint]

    def _build(self, hint: Any) -> _Rule | None:  # noqa: C901 - one flat switch
        if hint is Any or hint is object or hint is inspect.Parameter.empty:
            return None
        if hint is None:
            hint = type(None)
        scalar = _SCALAR_RULES.get(hint)
        if scalar is not None:
            return scalar
        origin = typing.get_origin(hint)
        args = typing.get_args(hint)
        if origin is typing.Union or origin is types.UnionType:
            return self._union(hint, args)
        if origin is typing.Literal:
            return self._literal(hint, args)
        if origin in _SEQUENCE_ORIGINS:
            return self._collection(hint, origin, args)
        if origin is tuple:
            return self._tuple(hint, args)
        if origin in _MAPPING_ORIGINS:
            return self._mapping(hint, args)
        if origin is not None:
            return self.rule(origin)
        if hasattr(hint, "__supertype__"):  # typing.NewType
            return self.rule(hint.__supertype__)
        if not isinstance(hint, type):
            return None  # TypeVar, Callable and other hints we do not check
        if issubclass(hint, Enum):
            return self._enum(hint)
        if dataclasses.is_dataclass(hint):
            return self._dataclass(hint)
        if callable(getattr(hint, "model_validate", None)):
            return self._pydantic(hint)
        if hint in (list, tuple, set, frozenset, dict):
            return self._build(hint[Any])
        try:
            issubclass(int, hint)
        except TypeError:
            return None  # a non-runtime protocol and the like: cannot check
        return _scalar(hint, exclude_bool=hint is not int and not issubclass(bool, hint))

    def _union(self, hint: Any, args: tuple[Any, ...]) -> _Rule | None:
        allow_none = type(None) in args
        rules = [self.rule(a) for a in args if a is not type(None)]
        if any(r is None for r in rules):
            return None
        alternatives = [r for r in rules if r is not None]
        expected = hint_name(hint)

        def convert(value: Any) -> Any:
            if value is None and allow_none:
                return None
            if len(alternatives) == 1:
                try:
                    return alternatives[0].apply(value)
                except PathFailure as failure:
                    if failure.segments:  # deeper inside: that path says more
                        raise
                    raise _mismatch(expected, value) from None
            for alternative in alternatives:
                try:
                    return alternative.apply(value)
                except PathFailure:
                    continue
            raise _mismatch(expected, value)

        return _Rule(expected, convert)

    def _literal(self, hint: Any, args: tuple[Any, ...]) -> _Rule:
        expected = hint_name(hint)

        def convert(value: Any) -> Any:
            for allowed in args:
                if value == allowed and type(value) is type(allowed):
                    return value
            raise PathFailure(f"expects {expected}, got {value!r}")

        return _Rule(expected, convert)

    def _collection(self, hint: Any, origin: Any, args: tuple[Any, ...]) -> _Rule:
        item = self.rule(args[0]) if args else None
        expected = hint_name(hint)
        make: Callable[[list[Any]], Any] = (
            frozenset
            if origin is frozenset
            else set
            if origin in (set, collections.abc.Set, collections.abc.MutableSet)
            else (lambda v: v)
        )

        def convert(value: Any) -> Any:
            if not isinstance(value, list | tuple | set | frozenset):
                raise _mismatch(expected, value)
            if item is None:
                return make(value if isinstance(value, list) else list(value))
            return make(_apply_each(item, value if isinstance(value, list) else list(value)))

        return _Rule(expected, convert)

    def _tuple(self, hint: Any, args: tuple[Any, ...]) -> _Rule:
        expected = hint_name(hint)
        if not args or (len(args) == 2 and args[1] is Ellipsis):
            item = self.rule(args[0]) if args else None

            def convert_var(value: Any) -> Any:
                if not isinstance(value, list | tuple):
                    raise _mismatch(expected, value)
                return tuple(value if item is None else _apply_each(item, value))

            return _Rule(expected, convert_var)
        rules = [self.rule(a) for a in args]

        def convert_fixed(value: Any) -> Any:
            if not isinstance(value, list | tuple):
                raise _mismatch(expected, value)
            if len(value) != len(rules):
                raise _mismatch(expected, value, f" of length {len(value)}")
            out = []
            for index, (rule, item) in enumerate(zip(rules, value, strict=True)):
                try:
                    out.append(item if rule is None else rule.apply(item))
                except PathFailure as failure:
                    failure.add_index(index)
                    raise
            return tuple(out)

        return _Rule(expected, convert_fixed)

    def _mapping(self, hint: Any, args: tuple[Any, ...]) -> _Rule:
        value_rule = self.rule(args[1]) if len(args) == 2 else None
        expected = hint_name(hint)

        def convert(value: Any) -> Any:
            if not isinstance(value, Mapping):
                raise _mismatch(expected, value)
            if value_rule is None:
                return value
            return _apply_values(value_rule, value)

        return _Rule(expected, convert)

    def _enum(self, hint: type[Enum]) -> _Rule:
        expected = hint.__qualname__

        def convert(value: Any) -> Any:
            if isinstance(value, hint):
                return value
            try:
                return hint(value)
            except ValueError:
                raise PathFailure(f"expects {expected}, got {value!r}") from None

        return _Rule(expected, convert)

    def _dataclass(self, hint: type) -> _Rule:
        expected = hint.__qualname__
        rule = _Rule(expected)
        self._memo[hint] = rule  # before the fields: a field may refer back to this class
        try:
            field_hints = typing.get_type_hints(hint)
        except Exception:
            field_hints = {}
        fields = dataclasses.fields(hint)
        init_rules = {
            f.name: self.rule(field_hints[f.name]) if f.name in field_hints else None
            for f in fields
            if f.init
        }
        computed = {f.name for f in fields if not f.init}
        required = {
            f.name
            for f in fields
            if f.init
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        }

        def convert(value: Any) -> Any:
            if isinstance(value, hint):
                return value
            if not isinstance(value, Mapping):
                raise _mismatch(expected, value)
            kwargs = {}
            for key, item in value.items():
                if key not in init_rules:
                    if key in computed:
                        continue  # init=False fields, as to_plain writes them
                    raise _mismatch(expected, value, f" with unknown field {key!r}")
                field_rule = init_rules[key]
                try:
                    kwargs[key] = item if field_rule is None else field_rule.apply(item)
                except PathFailure as failure:
                    failure.add_attr(key)
                    raise
            missing = required.difference(kwargs)
            if missing:
                names = ", ".join(repr(n) for n in sorted(missing))
                raise _mismatch(expected, value, f" without field {names}")
            try:
                return hint(**kwargs)
            except (TypeError, ValueError) as err:
                raise PathFailure(f"expects {expected}; building it failed: {err}") from None

        rule.convert = convert
        return rule

    def _pydantic(self, hint: type) -> _Rule:
        expected = hint.__qualname__
        validate = hint.model_validate  # type: ignore[attr-defined]

        def convert(value: Any) -> Any:
            if isinstance(value, hint):
                return value
            try:
                return validate(value)
            except ValueError as err:  # pydantic.ValidationError is a ValueError
                detail = "; ".join(line.strip() for line in str(err).splitlines())
                raise PathFailure(f"expects {expected}; validation failed: {detail}") from None

        return _Rule(expected, convert)


def hint_name(hint: Any) -> str:
    """Return a type hint as written in code: ``list[int]``, ``Point | None``."""
    if hint is None or hint is type(None):
        return "None"
    if hint is Ellipsis:
        return "..."
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union or origin is types.UnionType:
        return " | ".join(hint_name(a) for a in args)
    if origin is typing.Literal:
        return f"Literal[{', '.join(repr(a) for a in args)}]"
    if origin is not None:
        base = hint_name(origin)
        return f"{base}[{', '.join(hint_name(a) for a in args)}]" if args else base
    if isinstance(hint, type):
        return hint.__qualname__
    return repr(hint).replace("typing.", "")

"""Declarative device state: what of an object to save, how it travels, how it loads back.

A :class:`VMStateDescription` names an entry, its version, the oldest version it still loads,
and its :class:`Field` list; :func:`save` turns an object into bytes, :func:`load` puts bytes
back into an object, and :func:`decode` turns bytes into plain values without any object (for
the stream analyzer).  The idea is QEMU's ``VMStateDescription``; the shape is Python's: fields
are named attributes of dataclasses (or keys of dicts), sizes of variable parts are other fields
or explicit length prefixes, and everything a stream could lie about is checked before it is
believed.

Wire encoding of one description (little-endian, no padding, no alignment)::

    +---------+---------+-----+---------+------------------------------+------+
    | field 0 | field 1 | ... | field n | subsection | ... | subsection | 0x00 |
    +---------+---------+-----+---------+------------------------------+------+

    subsection:
    +------+----------+----------------+----------------+----------------+--------------------+
    | 0x05 | name_len | name           | version_id     | nbytes         | data               |
    | u8   | u8       | name_len bytes | u32            | u32            | nbytes: the        |
    |      |          | (UTF-8)        |                |                | subsection's own   |
    |      |          |                |                |                | encoding, incl. its|
    |      |          |                |                |                | closing 0x00       |
    +------+----------+----------------+----------------+----------------+--------------------+

Field encodings, in declaration order, skipping a field whose ``version_id`` is above the
version being written or read:

    ===============================  ===========================================================
    u8 u16 u32 u64 / i8 ... i64      1/2/4/8 bytes, little-endian (two's complement for iN)
    bool                             1 byte, 0 or 1 (anything else is refused on load)
    array(elem, k)                   k element encodings back to back
    varray(elem, count="n")          value-of-n element encodings, no prefix
    varray(elem)                     u32 element count, then the elements
    buffer(k)                        k raw bytes
    buffer(size="n")                 value-of-n raw bytes
    buffer()                         u32 byte count, then the bytes
    struct(vmsd)                     the nested description's full encoding (its fields, its
                                     subsections, its 0x00), at that description's version_id
    ===============================  ===========================================================

A subsection is optional state: it is written only when its ``needed(obj)`` says so, it applies
to the same object as its parent, and a stream without it loads with the object's defaults
(the parent's ``post_load`` can fix up).  That is how state grows without a version bump: an
older build receiving an unknown subsection fails loudly, naming it, instead of misreading.
Every subsection carries its own version and length, so it is parsed in a bounded window.

Every field declares the values a destination takes (:class:`Bound`: a range, an exact length,
a rule over the fields before it, or any value of its type), with ends that may depend on the
shape of the guest being loaded (its vCPU count, XSAVE size, a vCPU's share of memory...), so a
value that indexes, sizes, counts or addresses anything is bounded before it is used.

Loading is two-phase: the whole entry is parsed and checked first, bounds included, then
applied to the object, so a stream that fails any check leaves the object untouched.  Hooks run in QEMU's order:
``pre_save(obj)`` before a description's fields are read, ``post_load(obj, version_id)`` after
its fields and subsections are set (nested descriptions' hooks before their parent's).
"""

from __future__ import annotations

import functools
import operator
import struct
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

from pymig.errors import StateError

SUBSECTION_MARKER = 0x05
END_MARKER = 0x00
SUBSECTION_HEADER = struct.Struct("<II")  # version_id, nbytes (after the name)
U32 = struct.Struct("<I")

DEFAULT_MAX_COUNT = 1 << 16  # elements in a variable-length array unless declared otherwise
DEFAULT_MAX_BYTES = 1 << 24  # bytes in a variable-length buffer (16 MiB) unless declared


@dataclass(frozen=True)
class Scalar:
    """One fixed-size value type: its struct code, size and the range it can hold."""

    name: str
    code: str
    size: int
    lo: int
    hi: int

    @property
    def is_bool(self) -> bool:
        return self.name == "bool"


def _int_type(name: str, code: str, bits: int, signed: bool) -> Scalar:
    if signed:
        return Scalar(name, code, bits // 8, -(1 << (bits - 1)), (1 << (bits - 1)) - 1)
    return Scalar(name, code, bits // 8, 0, (1 << bits) - 1)


SCALARS: dict[str, Scalar] = {
    "u8": _int_type("u8", "B", 8, False),
    "u16": _int_type("u16", "H", 16, False),
    "u32": _int_type("u32", "I", 32, False),
    "u64": _int_type("u64", "Q", 64, False),
    "i8": _int_type("i8", "b", 8, True),
    "i16": _int_type("i16", "h", 16, True),
    "i32": _int_type("i32", "i", 32, True),
    "i64": _int_type("i64", "q", 64, True),
    "bool": Scalar("bool", "B", 1, 0, 1),
}
_SCALAR_STRUCTS = {t.code: struct.Struct("<" + t.code) for t in SCALARS.values()}


Limit = int | Callable[[Any], int]
"""A bound's end: a number, or a function of the destination guest's shape giving one."""


@dataclass(frozen=True)
class Bound:
    """What a stream may say for one field, declared next to the field.

    ``lo`` / ``hi`` bound a scalar's value, or every element of an array of scalars; ``exact``
    is the element count (byte count for a buffer) a variable-length field must have;
    ``check(value, values)`` is any other rule, over the value and the fields of the same
    description read before it (say a list as long as another), returning the problem in words
    or None.  ``lo``, ``hi`` and ``exact`` may be functions of the *shape*: the object a loader
    is given that describes the guest the destination built (its vCPU count, its XSAVE size,
    the share of the vCPU being loaded...).  ``any`` declares that every value the field's type
    can hold is valid (a general-purpose register), with ``why`` saying so.

    A field of a nested description is bounded by that description's own fields; a scalar
    field without a bound is left undeclared (:attr:`Field.declared`), which a project's
    descriptions never are.
    """

    lo: Limit | None = None
    hi: Limit | None = None
    exact: Limit | None = None
    check: Callable[[Any, Mapping[str, Any]], str | None] | None = None
    any: bool = False
    why: str = ""

    def __post_init__(self) -> None:
        if self.any and (self.lo is not None or self.hi is not None or self.exact is not None
                         or self.check is not None):
            raise ValueError("a bound of any value takes no lo, hi, exact or check")

    @property
    def dynamic(self) -> bool:
        """Whether an end depends on the guest's shape."""
        return any(callable(x) for x in (self.lo, self.hi, self.exact))

    def limits(self, t: Scalar, shape: Any) -> tuple[int, int]:
        """``(lo, hi)`` for a value of type ``t`` in a guest of ``shape`` (None: this build's
        static ends only, the type's where an end needs the shape)."""
        lo = _resolve(self.lo, shape, t.lo)
        hi = _resolve(self.hi, shape, t.hi)
        return max(lo, t.lo), min(hi, t.hi)


def _resolve(limit: Limit | None, shape: Any, default: int) -> int:
    if limit is None:
        return default
    if callable(limit):
        return default if shape is None else int(limit(shape))
    return limit


#: Every value of the field's type is valid.
ANY = Bound(any=True)


def any_value(why: str) -> Bound:
    """A bound of any value of the field's type, saying why that is safe."""
    return Bound(any=True, why=why)


def _scalar_struct(t: Scalar) -> struct.Struct:
    return _SCALAR_STRUCTS.get(t.code) or struct.Struct("<" + t.code)


def _element(elem: str | Scalar | VMStateDescription) -> Scalar | VMStateDescription:
    if isinstance(elem, (Scalar, VMStateDescription)):
        return elem
    try:
        return SCALARS[elem]
    except (KeyError, TypeError):
        raise ValueError(
            f"array element must be one of {sorted(SCALARS)} or a VMStateDescription, not {elem!r}"
        ) from None


def _scalar_constructor(type_name: str) -> classmethod:
    """``Field.u32("eax")`` and its siblings: one constructor per scalar type."""

    def make(cls: type[Field], name: str, *, version_id: int = 0, lo: Limit | None = None,
             hi: Limit | None = None, check: Callable[..., str | None] | None = None,
             bound: Bound | None = None) -> Field:
        return cls.scalar(name, type_name, version_id=version_id, lo=lo, hi=hi, check=check,
                          bound=bound)

    make.__name__ = make.__qualname__ = type_name
    make.__doc__ = f"A {type_name} field."
    return classmethod(make)


@dataclass(frozen=True)
class Field:
    """One named piece of an object's state.

    Build fields with the constructors (``Field.u32("eax")``, ``Field.buffer("xsave", 4096)``,
    ``Field.varray("msrs", MSR_VMSD, count="nmsrs")``, ``Field.struct("cs", SEGMENT_VMSD)``);
    every constructor takes ``version_id``: the field exists in streams of that version and later
    (0: always).

    ``kind`` is ``scalar``, ``struct``, ``array`` (a list of scalars or of structs) or ``buffer``
    (bytes).  An array or buffer is sized by exactly one of: ``length`` (fixed), ``count`` (the
    name of an earlier integer field of the same description) or neither (a u32 prefix on the
    wire).  ``max_count`` bounds the variable sizes a stream may claim.

    ``bound`` (:class:`Bound`) says which values a stream may carry; the constructors build it
    from ``lo``, ``hi``, ``exact`` and ``check``, or take one whole (``bound=ANY``).  The loader
    refuses a value outside it, naming entry, field and value, before anything is applied.
    """

    name: str
    kind: str
    elem: Scalar | VMStateDescription
    length: int | None = None
    count: str | None = None
    max_count: int = DEFAULT_MAX_COUNT
    version_id: int = 0
    bound: Bound | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a field needs a non-empty name, not {self.name!r}")
        b = self.bound
        if b is not None:
            if not isinstance(b, Bound):
                raise ValueError(f"field {self.name}: bound must be a Bound, not {b!r}")
            if self.kind == "struct":
                raise ValueError(f"field {self.name}: a nested description bounds its own fields")
            if b.exact is not None and self.kind == "scalar":
                raise ValueError(f"field {self.name}: exact is for arrays and buffers")
            if (b.lo is not None or b.hi is not None) and (
                    self.kind == "buffer" or not isinstance(self.elem, Scalar)):
                raise ValueError(f"field {self.name}: lo/hi bound scalars or their arrays")
        if self.version_id < 0:
            raise ValueError(f"field {self.name}: version_id must be >= 0")
        if self.length is not None and self.length < 0:
            raise ValueError(f"field {self.name}: length must be >= 0")
        if self.length is not None and self.count is not None:
            raise ValueError(f"field {self.name}: give a fixed length or a count field, not both")
        if self.max_count < 0:
            raise ValueError(f"field {self.name}: max_count must be >= 0")

    # --- scalars ---------------------------------------------------------------------------
    @classmethod
    def scalar(cls, name: str, type_name: str, *, version_id: int = 0, lo: Limit | None = None,
               hi: Limit | None = None, check: Callable[..., str | None] | None = None,
               bound: Bound | None = None) -> Field:
        if type_name not in SCALARS:
            raise ValueError(f"field {name}: unknown scalar type {type_name!r}")
        return cls(name, "scalar", SCALARS[type_name], version_id=version_id,
                   bound=_make_bound(name, bound, lo, hi, None, check))

    u8 = _scalar_constructor("u8")
    u16 = _scalar_constructor("u16")
    u32 = _scalar_constructor("u32")
    u64 = _scalar_constructor("u64")
    i8 = _scalar_constructor("i8")
    i16 = _scalar_constructor("i16")
    i32 = _scalar_constructor("i32")
    i64 = _scalar_constructor("i64")
    bool = _scalar_constructor("bool")

    # --- composites --------------------------------------------------------------------------
    @classmethod
    def struct(cls, name: str, vmsd: VMStateDescription, *, version_id: int = 0) -> Field:
        """A nested object described by ``vmsd`` (filled in place on load, or built)."""
        if not isinstance(vmsd, VMStateDescription):
            raise ValueError(f"field {name}: struct needs a VMStateDescription, not {vmsd!r}")
        return cls(name, "struct", vmsd, version_id=version_id)

    @classmethod
    def array(cls, name: str, elem: str | VMStateDescription, length: int, *,
              version_id: int = 0, lo: Limit | None = None, hi: Limit | None = None,
              check: Callable[..., str | None] | None = None,
              bound: Bound | None = None) -> Field:
        """A list of exactly ``length`` elements (a scalar type name or a description)."""
        if not isinstance(length, int):
            raise ValueError(f"field {name}: array length must be an int (use varray for a "
                             f"length given by another field), not {length!r}")
        return cls(name, "array", _element(elem), length=length, version_id=version_id,
                   bound=_make_bound(name, bound, lo, hi, None, check))

    @classmethod
    def varray(cls, name: str, elem: str | VMStateDescription, count: str | None = None, *,
               max_count: int = DEFAULT_MAX_COUNT, version_id: int = 0,
               lo: Limit | None = None, hi: Limit | None = None, exact: Limit | None = None,
               check: Callable[..., str | None] | None = None,
               bound: Bound | None = None) -> Field:
        """A list whose length is the value of the earlier field ``count`` or, without one, a
        u32 prefix; a stream claiming more than ``max_count`` elements is refused."""
        return cls(name, "array", _element(elem), count=count, max_count=max_count,
                   version_id=version_id, bound=_make_bound(name, bound, lo, hi, exact, check))

    @classmethod
    def buffer(cls, name: str, size: int | str | None = None, *,
               max_size: int = DEFAULT_MAX_BYTES, version_id: int = 0,
               exact: Limit | None = None, check: Callable[..., str | None] | None = None,
               bound: Bound | None = None) -> Field:
        """Raw bytes: ``size`` bytes when an int, the value of that earlier field when a str,
        a u32-prefixed length when None (at most ``max_size`` either way when variable)."""
        declared = _make_bound(name, bound, None, None, exact, check)
        if isinstance(size, str):
            return cls(name, "buffer", SCALARS["u8"], count=size, max_count=max_size,
                       version_id=version_id, bound=declared)
        return cls(name, "buffer", SCALARS["u8"], length=size, max_count=max_size,
                   version_id=version_id, bound=declared)

    @property
    def prefixed(self) -> bool:
        """Whether the wire carries this field's element count as a u32 prefix."""
        return self.kind in ("array", "buffer") and self.length is None and self.count is None

    @property
    def declared(self) -> bool:
        """Whether the field says which values it takes (a nested description's fields say
        it for themselves)."""
        return self.kind == "struct" or self.bound is not None


def _make_bound(name: str, bound: Bound | None, lo: Limit | None, hi: Limit | None,
                exact: Limit | None, check: Callable[..., str | None] | None) -> Bound | None:
    given = (lo, hi, exact, check)
    if bound is not None:
        if any(x is not None for x in given):
            raise ValueError(f"field {name}: give a bound or lo/hi/exact/check, not both")
        return bound
    if all(x is None for x in given):
        return None
    return Bound(lo=lo, hi=hi, exact=exact, check=check)


@dataclass(frozen=True, eq=False)
class VMStateDescription:
    """How one kind of object is saved and loaded.

    ``version_id`` is what :func:`save` writes; :func:`load` accepts streams of versions
    ``minimum_version_id..version_id``.  ``subsections`` are descriptions of optional extra state
    of the same object, each sent when its ``needed(obj)`` returns true (always, without one).
    ``pre_save(obj)`` runs before saving, ``post_load(obj, version_id)`` after loading.
    ``factory()`` builds a fresh object when this description is nested in another and there is
    no object to fill (default: a dict).
    """

    name: str
    version_id: int
    minimum_version_id: int
    fields: tuple[Field, ...]
    subsections: tuple[VMStateDescription, ...] = ()
    pre_save: Callable[[Any], None] | None = None
    post_load: Callable[[Any, int], None] | None = None
    needed: Callable[[Any], bool] | None = None
    factory: Callable[[], Any] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "fields", tuple(self.fields))
        object.__setattr__(self, "subsections", tuple(self.subsections))
        if not isinstance(self.name, str) or not 0 < len(self.name.encode()) <= 255:
            raise ValueError(f"a description name must be 1..255 bytes of UTF-8, not {self.name!r}")
        if not 0 <= self.minimum_version_id <= self.version_id:
            raise ValueError(f"{self.name}: need 0 <= minimum_version_id <= version_id, got "
                             f"{self.minimum_version_id} and {self.version_id}")
        seen: dict[str, Field] = {}
        for f in self.fields:
            if not isinstance(f, Field):
                raise ValueError(f"{self.name}: fields must be Field objects, not {f!r}")
            if f.name in seen:
                raise ValueError(f"{self.name}: field {f.name} is declared twice")
            if f.version_id > self.version_id:
                raise ValueError(f"{self.name}: field {f.name} has version_id {f.version_id}, "
                                 f"above the description's {self.version_id}")
            if f.count is not None:
                counter = seen.get(f.count)
                if counter is None:
                    raise ValueError(f"{self.name}: field {f.name} is sized by {f.count}, which "
                                     "must be an earlier field of the same description")
                if counter.kind != "scalar" or counter.elem.is_bool:
                    raise ValueError(f"{self.name}: size field {f.count} must be an integer")
                if counter.version_id > f.version_id:
                    raise ValueError(f"{self.name}: size field {f.count} is newer than the "
                                     f"field {f.name} it sizes")
            seen[f.name] = f
        names = [s.name for s in self.subsections]
        if any(not isinstance(s, VMStateDescription) for s in self.subsections):
            raise ValueError(f"{self.name}: subsections must be VMStateDescriptions")
        if len(set(names)) != len(names):
            raise ValueError(f"{self.name}: subsection names must be unique: {names}")
        object.__setattr__(self, "_by_name", {s.name: s for s in self.subsections})
        object.__setattr__(self, "_fields_by_name", seen)
        object.__setattr__(self, "min_bytes", 1 + sum(_min_field_bytes(f) for f in self.fields))
        # The current version's plan is built here, not inside the first downtime.
        object.__setattr__(self, "_plans", {self.version_id: _plan(self.fields, self.version_id)})

    def plan(self, version_id: int) -> tuple[Field | _ScalarRun, ...]:
        """The fields a stream of ``version_id`` carries, runs of integer fields merged."""
        plans = self._plans  # type: ignore[attr-defined]
        steps = plans.get(version_id)
        if steps is None:
            steps = plans[version_id] = _plan(self.fields, version_id)
        return steps

    def subsection(self, name: str) -> VMStateDescription | None:
        """The subsection called ``name``, or None."""
        return self._by_name.get(name)  # type: ignore[attr-defined]

    def field(self, name: str) -> Field:
        return self._fields_by_name[name]  # type: ignore[attr-defined]


class _ScalarRun:
    """Consecutive integer fields packed and unpacked with one struct: a vCPU's state is a
    couple of hundred of them, and field-by-field Python work sits inside the downtime.  Any
    failure goes back to the fields one by one, whose errors name the field."""

    __slots__ = ("fields", "names", "struct", "items", "attrs", "static", "dynamic")

    def __init__(self, fields: list[Field]):
        self.fields = tuple(fields)
        self.names = tuple(f.name for f in fields)
        self.struct = struct.Struct("<" + "".join(f.elem.code for f in fields))
        self.items = operator.itemgetter(*self.names)  # a tuple: a run has two or more
        self.attrs = operator.attrgetter(*self.names)
        # Bounds, precomputed: the static ends narrower than the type, checked on the unpacked
        # tuple (a register file has none), and the fields whose bound needs the guest's shape
        # or a rule, checked one by one.
        static, dynamic = [], []
        for i, f in enumerate(fields):
            b = f.bound
            if b is None or b.any:
                continue
            lo, hi = b.limits(f.elem, None)
            if lo > f.elem.lo or hi < f.elem.hi:
                static.append((i, lo, hi))
            if b.dynamic or b.check is not None:
                dynamic.append((i, f))
        self.static = tuple(static)
        self.dynamic = tuple(dynamic)

    def values(self, obj: Any) -> tuple[Any, ...] | None:
        """The run's values in ``obj``, or None if one is missing."""
        try:
            return self.items(obj) if _is_mapping(obj) else self.attrs(obj)
        except (KeyError, AttributeError):
            return None


def _plan(fields: tuple[Field, ...], version_id: int) -> tuple[Field | _ScalarRun, ...]:
    steps: list[Field | _ScalarRun] = []
    run: list[Field] = []
    for f in fields:
        if f.version_id > version_id:
            continue
        if f.kind == "scalar" and not f.elem.is_bool:
            run.append(f)
            continue
        if run:
            steps.append(_ScalarRun(run) if len(run) > 1 else run[0])
            run = []
        steps.append(f)
    if run:
        steps.append(_ScalarRun(run) if len(run) > 1 else run[0])
    return tuple(steps)


def _elem_min_bytes(elem: Scalar | VMStateDescription) -> int:
    return elem.size if isinstance(elem, Scalar) else elem.min_bytes  # type: ignore[attr-defined]


def _min_field_bytes(f: Field) -> int:
    """Fewest bytes the field can take on the wire (at the description's current version)."""
    if f.kind in ("scalar", "struct"):
        return _elem_min_bytes(f.elem)
    if f.length is not None:
        return f.length * _elem_min_bytes(f.elem)
    return U32.size if f.prefixed else 0


# --- object access ------------------------------------------------------------------------------

_MISSING = object()


@functools.cache
def _subclass_of(kind: type, abc: type) -> bool:
    return issubclass(kind, abc)  # an ABC check is slow: once per type


def _is_mapping(obj: Any) -> bool:
    return _subclass_of(type(obj), Mapping)


def _is_mutable_mapping(obj: Any) -> bool:
    return _subclass_of(type(obj), MutableMapping)


def _get(obj: Any, name: str, default: Any = _MISSING) -> Any:
    if _is_mapping(obj):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _set(obj: Any, name: str, value: Any) -> None:
    if _is_mutable_mapping(obj):
        obj[name] = value
    else:
        setattr(obj, name, value)


class _Context:
    """Names for error messages: the entry (top description) and where in it we are; and the
    shape of the guest being loaded, which bounds may depend on (None: no guest)."""

    __slots__ = ("entry", "shape")

    def __init__(self, entry: str, shape: Any = None):
        self.entry = entry
        self.shape = shape

    def error(self, path: str | None, message: str, versions: tuple[int, ...] | None = None,
              value: Any = None) -> StateError:
        where = f" field {path}" if path else ""
        return StateError(f"{self.entry}{where}: {message}", entry=self.entry, field=path,
                          versions=versions, value=value)

    def hook(self, what: str, vmsd: VMStateDescription, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except StateError:
            raise
        except Exception as exc:  # noqa: BLE001 - any hook failure is a state failure
            raise StateError(f"{self.entry}: {what} of {vmsd.name} failed: {exc!r}",
                             entry=self.entry) from exc


# --- save ---------------------------------------------------------------------------------------

def save(vmsd: VMStateDescription, obj: Any) -> bytes:
    """Encode ``obj`` as ``vmsd`` describes, at ``vmsd.version_id``."""
    out = bytearray()
    _save_into(vmsd, obj, out, _Context(vmsd.name), "")
    return bytes(out)


def _save_into(vmsd: VMStateDescription, obj: Any, out: bytearray, ctx: _Context,
               prefix: str) -> None:
    if vmsd.pre_save is not None:
        ctx.hook("pre_save", vmsd, vmsd.pre_save, obj)
    counts: dict[str, int] = {}
    for f in vmsd.plan(vmsd.version_id):
        if type(f) is _ScalarRun:
            values = f.values(obj)
            try:
                if values is None:
                    raise TypeError
                out += f.struct.pack(*values)
            except (struct.error, TypeError):
                for g in f.fields:  # says which field and why
                    counts[g.name] = _pack_scalar(g.elem, _get(obj, g.name), out, ctx,
                                                  prefix + g.name)
                raise ctx.error(prefix.rstrip(".") or None, "cannot pack its integer fields")
            counts.update(zip(f.names, values))
            continue
        path = prefix + f.name
        value = _get(obj, f.name)
        if value is _MISSING:
            raise ctx.error(path, f"the object ({type(obj).__name__}) has no value for it")
        if f.kind == "scalar":
            number = _pack_scalar(f.elem, value, out, ctx, path)
            counts[f.name] = number
        elif f.kind == "struct":
            _save_into(f.elem, value, out, ctx, path + ".")
        else:
            _save_sequence(f, value, counts, out, ctx, path)
    for sub in vmsd.subsections:
        if sub.needed is not None and not ctx.hook("needed", sub, sub.needed, obj):
            continue
        body = bytearray()
        _save_into(sub, obj, body, ctx, prefix + sub.name + ".")
        name = sub.name.encode()
        out += bytes((SUBSECTION_MARKER, len(name))) + name
        out += SUBSECTION_HEADER.pack(sub.version_id, len(body))
        out += body
    out.append(END_MARKER)


def _pack_scalar(t: Scalar, value: Any, out: bytearray, ctx: _Context, path: str) -> int:
    try:
        number = operator.index(value)
    except TypeError:
        raise ctx.error(path, f"{t.name} needs an integer, not {type(value).__name__}") from None
    if not t.lo <= number <= t.hi:
        raise ctx.error(path, f"{number} does not fit {t.name} [{t.lo}, {t.hi}]")
    out += _scalar_struct(t).pack(number)
    return number


def _save_sequence(f: Field, value: Any, counts: dict[str, int], out: bytearray, ctx: _Context,
                   path: str) -> None:
    if f.kind == "buffer":
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise ctx.error(path, f"a buffer needs bytes, not {type(value).__name__}")
        value = bytes(value)
    n = len(value)
    if f.length is not None and n != f.length:
        raise ctx.error(path, f"has {n} elements, the description fixes {f.length}")
    if f.count is not None and n != counts[f.count]:
        raise ctx.error(path, f"has {n} elements but its size field {f.count} says "
                              f"{counts[f.count]}")
    if f.length is None and n > f.max_count:
        raise ctx.error(path, f"has {n} elements, more than its maximum {f.max_count}")
    if f.prefixed:
        out += U32.pack(n)
    if f.kind == "buffer":
        out += value
    elif isinstance(f.elem, Scalar):
        # Whole arrays at once (MSR lists, register files): per-element work is for the
        # error message of the first bad element only.
        t = f.elem
        try:
            numbers = [operator.index(item) for item in value]
        except TypeError:
            numbers = None
        if numbers is None or (numbers and not t.lo <= min(numbers) <= max(numbers) <= t.hi):
            for i, item in enumerate(value):
                _pack_scalar(t, item, bytearray(), ctx, f"{path}[{i}]")
        out += struct.pack(f"<{n}{t.code}", *numbers)
    else:
        for i, item in enumerate(value):
            _save_into(f.elem, item, out, ctx, f"{path}[{i}].")


# --- load ---------------------------------------------------------------------------------------

@dataclass
class _Parsed:
    """One description's values as read from the stream, before they touch any object."""

    vmsd: VMStateDescription
    version_id: int
    values: dict[str, Any]
    subsections: list[_Parsed]


class _Reader:
    """A bounded window [pos, end) over the data; every read checks it stays inside."""

    __slots__ = ("data", "pos", "end", "ctx")

    def __init__(self, data: memoryview, pos: int, end: int, ctx: _Context):
        self.data = data
        self.pos = pos
        self.end = end
        self.ctx = ctx

    @property
    def left(self) -> int:
        return self.end - self.pos

    def take(self, n: int, path: str | None) -> memoryview:
        if n > self.left:
            raise self.ctx.error(path, f"data truncated: needs {n} bytes, {self.left} left")
        view = self.data[self.pos:self.pos + n]
        self.pos += n
        return view

    def unpack(self, fmt: struct.Struct, path: str | None) -> tuple[Any, ...]:
        return fmt.unpack(self.take(fmt.size, path))


def load(vmsd: VMStateDescription, obj: Any, data: bytes | bytearray | memoryview,
         version_id: int, shape: Any = None) -> None:
    """Load ``data`` (written at ``version_id``) into ``obj``.

    The whole entry is parsed and checked before anything is set, so on :class:`StateError`
    from the stream ``obj`` is unchanged (a failing ``post_load``, ``factory`` or attribute
    assignment, which only the object's own code can cause, may leave it half-applied).
    Every field's :class:`Bound` is checked in that first phase; ``shape`` describes the
    guest being loaded, for the bounds that depend on it (without one only the static ends
    are checked: a destination always gives it).
    """
    parsed = _parse_entry(vmsd, data, version_id, shape)
    _apply(parsed, obj, _Context(vmsd.name))


def decode(vmsd: VMStateDescription, data: bytes | bytearray | memoryview,
           version_id: int, shape: Any = None) -> dict[str, Any]:
    """The field values in ``data`` by name, with no object and no hooks (bounds checked as
    :func:`load` checks them).

    Nested descriptions become dicts, arrays lists, buffers bytes; subsection fields sit next to
    their parent's fields, exactly as :func:`load` would set them on an object.
    """
    return _to_dict(_parse_entry(vmsd, data, version_id, shape))


def _parse_entry(vmsd: VMStateDescription, data: bytes | bytearray | memoryview,
                 version_id: int, shape: Any = None) -> _Parsed:
    ctx = _Context(vmsd.name, shape)
    view = memoryview(data).cast("B")
    reader = _Reader(view, 0, len(view), ctx)
    parsed = _parse(vmsd, reader, version_id, ctx, "")
    if reader.left:
        raise ctx.error(None, f"{reader.left} bytes of trailing data after the entry")
    return parsed


def _check_version(vmsd: VMStateDescription, version_id: int, ctx: _Context, path: str) -> None:
    versions = (version_id, vmsd.minimum_version_id, vmsd.version_id)
    where = path.rstrip(".") or None
    if version_id > vmsd.version_id:
        raise ctx.error(where, f"stream has version {version_id} of {vmsd.name}, newer than "
                               f"this build's version {vmsd.version_id}", versions)
    if version_id < vmsd.minimum_version_id:
        raise ctx.error(where, f"stream has version {version_id} of {vmsd.name}, older than "
                               f"the oldest this build loads ({vmsd.minimum_version_id})",
                        versions)


def _parse(vmsd: VMStateDescription, r: _Reader, version_id: int, ctx: _Context,
           prefix: str) -> _Parsed:
    _check_version(vmsd, version_id, ctx, prefix)
    values: dict[str, Any] = {}
    # Fields newer than the stream are not in it (not in the plan): the object keeps its default.
    for f in vmsd.plan(version_id):
        if type(f) is _ScalarRun:
            if f.struct.size <= r.left:
                numbers = f.struct.unpack(r.take(f.struct.size, None))
            else:
                numbers = tuple(_read_scalar(g.elem, r, prefix + g.name)  # truncated: say where
                                for g in f.fields)
            for i, lo, hi in f.static:
                if not lo <= numbers[i] <= hi:
                    g = f.fields[i]
                    raise _out_of_bounds(ctx, prefix + g.name, numbers[i], lo, hi)
            values.update(zip(f.names, numbers))
            for i, g in f.dynamic:
                _check_scalar(g, numbers[i], values, ctx, prefix + g.name)
            continue
        path = prefix + f.name
        if f.kind == "scalar":
            values[f.name] = number = _read_scalar(f.elem, r, path)
            if f.bound is not None and not f.bound.any:
                _check_scalar(f, number, values, ctx, path)
        elif f.kind == "struct":
            values[f.name] = _parse(f.elem, r, f.elem.version_id, ctx, path + ".")
        else:
            values[f.name] = items = _read_sequence(f, values, r, ctx, path)
            if f.bound is not None and not f.bound.any:
                _check_sequence(f, items, values, ctx, path)
    subsections: list[_Parsed] = []
    while True:
        (marker,) = r.take(1, prefix + "<subsection marker>")
        if marker == END_MARKER:
            break
        if marker != SUBSECTION_MARKER:
            raise ctx.error(prefix.rstrip(".") or None,
                            f"expected a subsection (0x05) or the end (0x00) of {vmsd.name}, "
                            f"found 0x{marker:02x}")
        subsections.append(_parse_subsection(vmsd, r, ctx, prefix, subsections))
    return _Parsed(vmsd, version_id, values, subsections)


def _parse_subsection(vmsd: VMStateDescription, r: _Reader, ctx: _Context, prefix: str,
                      done: list[_Parsed]) -> _Parsed:
    (name_len,) = r.take(1, prefix + "<subsection name>")
    raw = bytes(r.take(name_len, prefix + "<subsection name>"))
    name = raw.decode("utf-8", "backslashreplace")
    sub = vmsd.subsection(name)
    path = prefix + name
    if sub is None:
        known = ", ".join(s.name for s in vmsd.subsections) or "none"
        raise ctx.error(path, f"unknown subsection {name!r} in {vmsd.name} (this build knows: "
                              f"{known})")
    if any(p.vmsd is sub for p in done):
        raise ctx.error(path, f"subsection {name!r} appears twice")
    sub_version, nbytes = r.unpack(SUBSECTION_HEADER, path)
    if nbytes > r.left:
        raise ctx.error(path, f"subsection claims {nbytes} bytes, {r.left} left")
    window = _Reader(r.data, r.pos, r.pos + nbytes, ctx)
    parsed = _parse(sub, window, sub_version, ctx, path + ".")
    if window.left:
        raise ctx.error(path, f"{window.left} bytes of trailing data inside the subsection")
    r.pos += nbytes
    return parsed


def _read_scalar(t: Scalar, r: _Reader, path: str) -> int | bool:
    (number,) = _scalar_struct(t).unpack(r.take(t.size, path))
    if t.is_bool:
        if number > 1:
            raise r.ctx.error(path, f"a bool must be 0 or 1, found {number}", value=number)
        return bool(number)
    return number


def _out_of_bounds(ctx: _Context, path: str, value: Any, lo: int, hi: int) -> StateError:
    return ctx.error(path, f"{value} is out of bounds: this guest takes [{lo}, {hi}]",
                     value=value)


def _check_scalar(f: Field, value: int, values: dict[str, Any], ctx: _Context,
                  path: str) -> None:
    b = f.bound
    lo, hi = b.limits(f.elem, ctx.shape)
    if not lo <= value <= hi:
        raise _out_of_bounds(ctx, path, value, lo, hi)
    if b.check is not None:
        _run_check(b, value, values, ctx, path, value)


def _check_sequence(f: Field, items: Any, values: dict[str, Any], ctx: _Context,
                    path: str) -> None:
    b = f.bound
    n = len(items)
    if b.exact is not None:
        exact = _resolve(b.exact, ctx.shape, -1)
        if exact >= 0 and n != exact:
            unit = "bytes" if f.kind == "buffer" else "elements"
            raise ctx.error(path, f"{n} {unit}: this guest takes exactly {exact}", value=n)
    if (b.lo is not None or b.hi is not None) and n:
        lo, hi = b.limits(f.elem, ctx.shape)
        low, high = min(items), max(items)
        if low < lo or high > hi:
            i, bad = next((i, x) for i, x in enumerate(items) if not lo <= x <= hi)
            raise _out_of_bounds(ctx, f"{path}[{i}]", bad, lo, hi)
    if b.check is not None:
        _run_check(b, items, values, ctx, path, n if f.kind == "buffer" else items)


def _run_check(b: Bound, value: Any, values: dict[str, Any], ctx: _Context, path: str,
               shown: Any) -> None:
    try:
        problem = b.check(value, values)
    except Exception as exc:  # noqa: BLE001 - a rule that cannot judge the value refuses it
        problem = f"cannot be checked ({exc!r})"
    if problem:
        raise ctx.error(path, f"{_short(shown)}: {problem}", value=shown)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _read_sequence(f: Field, values: dict[str, Any], r: _Reader, ctx: _Context,
                   path: str) -> Any:
    if f.length is not None:
        n = f.length
    else:
        n = values[f.count] if f.count is not None else r.unpack(U32, path)[0]
        if n < 0:
            raise ctx.error(path, f"size field {f.count} is negative ({n})")
        if n > f.max_count:
            raise ctx.error(path, f"the stream claims {n} elements, more than the maximum "
                                  f"{f.max_count}", value=n)
    need = n * _elem_min_bytes(f.elem)
    if need > r.left:  # refuse before building anything of that size
        raise ctx.error(path, f"{n} elements need at least {need} bytes, {r.left} left")
    if f.kind == "buffer":
        return bytes(r.take(n, path))
    if isinstance(f.elem, Scalar):
        items = list(struct.unpack(f"<{n}{f.elem.code}", r.take(n * f.elem.size, path)))
        if f.elem.is_bool:
            for i, number in enumerate(items):
                if number > 1:
                    raise ctx.error(f"{path}[{i}]", f"a bool must be 0 or 1, found {number}",
                                    value=number)
            items = [bool(number) for number in items]
        return items
    return [_parse(f.elem, r, f.elem.version_id, ctx, f"{path}[{i}].") for i in range(n)]


# --- apply --------------------------------------------------------------------------------------

_NOT_FILLABLE = (int, float, str, bytes, bytearray, list, tuple)


def _apply(parsed: _Parsed, obj: Any, ctx: _Context, prefix: str = "") -> None:
    vmsd = parsed.vmsd
    mapping = _is_mutable_mapping(obj)
    for name, value in parsed.values.items():
        f = vmsd.field(name)
        if f.kind == "scalar":
            try:
                if mapping:
                    obj[name] = value
                else:
                    setattr(obj, name, value)
                continue
            except (AttributeError, TypeError):
                pass  # _set below raises it again, naming the field
        path = prefix + name
        if f.kind == "struct":
            target = _get(obj, name, None)
            if target is None or isinstance(target, _NOT_FILLABLE):
                target = _new_object(f.elem, ctx)
            _apply(value, target, ctx, path + ".")
            value = target
        elif f.kind == "array" and not isinstance(f.elem, Scalar):
            items = []
            for i, part in enumerate(value):
                item = _new_object(f.elem, ctx)
                _apply(part, item, ctx, f"{path}[{i}].")
                items.append(item)
            value = items
        try:
            _set(obj, name, value)
        except (AttributeError, TypeError) as exc:
            raise ctx.error(path, f"cannot be set on {type(obj).__name__}: {exc}") from exc
    for sub in parsed.subsections:
        _apply(sub, obj, ctx, prefix + sub.vmsd.name + ".")
    if vmsd.post_load is not None:
        ctx.hook("post_load", vmsd, vmsd.post_load, obj, parsed.version_id)


def _new_object(vmsd: VMStateDescription, ctx: _Context) -> Any:
    if vmsd.factory is None:
        return {}
    return ctx.hook("factory", vmsd, vmsd.factory)


def _to_dict(parsed: _Parsed) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in parsed.values.items():
        if isinstance(value, _Parsed):
            value = _to_dict(value)
        elif isinstance(value, list) and value and isinstance(value[0], _Parsed):
            value = [_to_dict(v) for v in value]
        out[name] = value
    for sub in parsed.subsections:
        out.update(_to_dict(sub))
    return out

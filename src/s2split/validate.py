"""One validation layer for every file and database row s2split reads.

Readers call :func:`read_json` (a file) or :func:`loads` (a text column of a
database row) and :func:`check` (a parsed document against a JSON Schema from
:mod:`s2split.schemas`). Every failure is an :class:`~s2split.errors.S2Error`
of one line naming WHERE (the file, or the database and row) and the key:

* the bytes must be UTF-8 (a profile saved as Latin-1 is named as such, not a
  ``UnicodeDecodeError``);
* the text must be JSON as RFC 8259 defines it: Python's ``NaN``,
  ``Infinity`` and numbers too large for a double are refused, so that no
  non-finite number reaches an estimate;
* the document must match its schema: types, ranges, required keys, known
  names.

The schemas are data (JSON Schema, draft 2020-12) checked by the
``jsonschema`` package; only what a schema cannot say (a profile inheriting
from itself) is checked by the reader.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .errors import S2Error


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is too large for a number")
    return value


def loads(text: str, where: str, invalid: str = "not valid JSON") -> Any:
    """Parse JSON text strictly: NaN, Infinity and overflowing numbers are
    errors, worded ``WHERE: INVALID: why``."""
    try:
        return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except json.JSONDecodeError as e:
        raise S2Error(f"{where}: {invalid}: {e.msg} at line {e.lineno} column "
                      f"{e.colno}") from None
    except ValueError as e:  # from the two hooks above
        raise S2Error(f"{where}: {invalid}: {e}") from None
    except RecursionError:
        raise S2Error(f"{where}: {invalid}: nested too deeply") from None


def read_text(path: str | Path, what: str) -> str:
    """A file's text, which must be UTF-8; WHAT names the kind of file in errors."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise S2Error(f"{path}: cannot read {what} ({e.strerror or e})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise S2Error(f"{path}: not a text file: a {what} must be UTF-8 (byte "
                      f"{data[e.start]:#04x} at offset {e.start})") from None


def read_json(path: str | Path, what: str, schema: dict | None = None,
              invalid: str = "not valid JSON") -> Any:
    """Read, parse and (with SCHEMA) check a JSON file."""
    data = loads(read_text(path, what), str(path), invalid)
    if schema is not None:
        check(data, schema, str(path))
    return data


def json_path(parts: Any) -> str:
    """``runs[0].phases[2].calls`` from a jsonschema error path."""
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=True, default=repr) if not isinstance(value, str) \
        else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


_JSON_TYPES = {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
               int: "an integer", float: "a number", type(None): "null"}


def _describe(error: Any) -> str:
    """One line for one jsonschema error (its own messages can span lines)."""
    v, inst = error.validator, error.instance
    got = _JSON_TYPES.get(type(inst), type(inst).__name__)
    if v == "type":
        want = error.validator_value
        want = " or ".join(want) if isinstance(want, list) else want
        return f"must be {'an' if want[0] in 'aeiou' else 'a'} {want}, got {got} {_short(inst)}"
    if v == "minimum" and error.validator_value == 0:
        return f"must be non-negative, got {_short(inst)}"
    if v in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"):
        op = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=",
              "exclusiveMaximum": "<"}[v]
        return f"must be {op} {error.validator_value}, got {_short(inst)}"
    if v == "required":
        missing = [k for k in error.validator_value if isinstance(inst, dict) and k not in inst]
        return f"missing key {missing[0]!r}" if missing else "missing a required key"
    if v == "additionalProperties":
        extra = sorted(k for k in inst if k not in error.schema.get("properties", {}))
        return f"unknown key {extra[0]!r}" if extra else "unknown key"
    if v == "propertyNames":
        return f"unknown name {_short(error.instance)}"
    if v == "const":
        return f"must be {_short(error.validator_value)}, got {_short(inst)}"
    if v == "enum":
        return f"must be one of {', '.join(map(_short, error.validator_value))}, got " \
               f"{_short(inst)}"
    if v == "minItems":
        return "must be a non-empty list" if error.validator_value == 1 else \
            f"needs at least {error.validator_value} items"
    if v in ("maxItems", "minLength", "pattern"):
        return f"{_short(inst)} does not match {error.validator_value!r}" if v == "pattern" \
            else error.message.splitlines()[0]
    return error.message.splitlines()[0][:120]


_validators: dict[int, Any] = {}


def _validator(schema: dict) -> Any:
    v = _validators.get(id(schema))
    if v is None:
        from jsonschema import Draft202012Validator
        v = _validators[id(schema)] = (Draft202012Validator(schema), schema)
    return v[0]


def check(data: Any, schema: dict, where: str) -> None:
    """Raise a one-line S2Error naming WHERE and the key when DATA does not
    match SCHEMA (the first error in document order)."""
    errors = list(_validator(schema).iter_errors(data))
    if not errors:
        return
    # propertyNames errors point at the object; name the bad key instead.
    error = min(errors, key=lambda e: [str(p) for p in e.absolute_path])
    if "propertyNames" in error.schema_path:
        key = json_path(error.absolute_path)
        name = error.instance
        raise S2Error(f"{where}: {key + ': ' if key else ''}unknown name {_short(name)}")
    key = json_path(error.absolute_path)
    raise S2Error(f"{where}: {key + ': ' if key else ''}{_describe(error)}")


def finite(value: Any, where: str, minimum: float | None = None) -> float:
    """A number read from a database column: finite (and >= MINIMUM)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not math.isfinite(value):
        raise S2Error(f"{where}: must be a finite number, got {_short(value)}")
    if minimum is not None and value < minimum:
        raise S2Error(f"{where}: must be >= {minimum}, got {_short(value)}")
    return float(value)

"""One validation layer for every file and database row s2split reads.

Readers call :func:`read_json` (a file) or :func:`loads` (a text column of a
database row) and :func:`check` (a parsed document against a JSON Schema from
:mod:`s2split.storage.schemas`). Every failure is an :class:`~s2split.plumbing.errors.S2Error`
of one line naming WHERE (the file, or the database and row) and the key:

* the file must be a regular file (a FIFO, a device such as ``/dev/zero`` or
  a directory is refused before it is opened for reading: none of them is a
  file that ends) of at most :func:`max_input_bytes` bytes;
* the bytes must be UTF-8 (a profile saved as Latin-1 is named as such, not a
  ``UnicodeDecodeError``); a leading byte-order mark is dropped;
* the text must be JSON as RFC 8259 defines it: Python's ``NaN``,
  ``Infinity`` and numbers too large for a double are refused, so that no
  non-finite number reaches an estimate; a key given twice in one object is
  refused (RFC 8259 leaves its meaning open; Python would keep the last);
* the document must match its schema: types, ranges, required keys, known
  names.

The schemas are data (JSON Schema, draft 2020-12) checked by the
``jsonschema`` package; only what a schema cannot say (a profile inheriting
from itself) is checked by the reader.
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path
from typing import Any

from .errors import S2Error

#: The largest input file read unless :data:`MAX_INPUT_ENV` says otherwise.
DEFAULT_MAX_INPUT_BYTES = 256 << 20
MAX_INPUT_ENV = "S2SPLIT_MAX_INPUT_BYTES"


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is too large for a number")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"duplicate key {key!r}")
        obj[key] = value
    return obj


def loads(text: str, where: str, invalid: str = "not valid JSON") -> Any:
    """Parse JSON text strictly: NaN, Infinity, overflowing numbers and a key
    given twice in one object are errors, worded ``WHERE: INVALID: why``."""
    try:
        return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float,
                          object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as e:
        raise S2Error(f"{where}: {invalid}: {e.msg} at line {e.lineno} column "
                      f"{e.colno}") from None
    except ValueError as e:  # from the two hooks above
        raise S2Error(f"{where}: {invalid}: {e}") from None
    except RecursionError:
        raise S2Error(f"{where}: {invalid}: nested too deeply") from None


def max_input_bytes() -> int:
    """The size limit of an input file: :data:`MAX_INPUT_ENV` if set (bytes,
    or with a K/M/G suffix), else :data:`DEFAULT_MAX_INPUT_BYTES`."""
    text = os.environ.get(MAX_INPUT_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_INPUT_BYTES
    shift = {"K": 10, "M": 20, "G": 30, "T": 40}.get(text[-1:].upper(), 0)
    try:
        value = int(text[:-1] if shift else text) << shift
    except ValueError:
        value = -1
    if value <= 0:
        raise S2Error(f"{MAX_INPUT_ENV}={text!r}: must be a positive number of bytes "
                      "(e.g. 1G)")
    return value


def file_kind(mode: int) -> str:
    """What a non-regular file is, for an error message."""
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def read_bytes(path: str | Path, what: str) -> bytes:
    """A regular file's bytes, at most :func:`max_input_bytes` of them; the
    file is recorded as an input (:func:`s2split.plumbing.output.note_input`). The
    kind is checked on the open descriptor, opened without blocking, so that
    a FIFO can neither hang the open nor slip in after a check."""
    from .output import note_input
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) |
                     getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise S2Error(f"{path}: cannot read {what} ({e.strerror or e})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise S2Error(f"{path}: cannot read {what} (is {file_kind(st.st_mode)}, not a "
                          "regular file)")
        limit = max_input_bytes()
        if st.st_size > limit:
            raise S2Error(f"{path}: {st.st_size} bytes, more than the {limit}-byte limit of a "
                          f"{what} (set {MAX_INPUT_ENV} to allow more)")
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:  # it grew while we read
            raise S2Error(f"{path}: more than the {limit}-byte limit of a {what} (set "
                          f"{MAX_INPUT_ENV} to allow more)")
    except OSError as e:
        raise S2Error(f"{path}: cannot read {what} ({e.strerror or e})") from None
    finally:
        os.close(fd)
    note_input(path)
    return b"".join(chunks)


def read_text(path: str | Path, what: str) -> str:
    """A file's text, which must be UTF-8 (a leading byte-order mark is
    dropped); WHAT names the kind of file in errors. See :func:`read_bytes`."""
    data = read_bytes(path, what)
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
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

"""JSON Schemas (draft 2020-12) of the files and database rows s2split reads,
checked by :func:`s2split.plumbing.validate.check`.

They are built here, not kept as static files, where a list of names comes
from the code (CPU features, counters, kernel functions), so that the schema
and the code cannot disagree. Everything here is importable without numpy.
"""

from __future__ import annotations

from dataclasses import fields
from functools import lru_cache

from ..arm64.features import Features
from ..selftest.phases import ITERATION_PHASES, _FIXED

#: SQLite's INTEGER is a signed 64-bit number.
INT64_MAX = (1 << 63) - 1
#: The longest phase time accepted, in seconds (11.6 days: a phase of the
#: selftest takes milliseconds to minutes; anything near this is a unit error,
#: and values near the largest double overflow the statistics).
MAX_SECONDS = 1e6
#: A measured phase: one the selftest (and ``hw run``) times.
PHASE_NAME = {"type": "string", "pattern":
              f"^(create_vm|destroy_vm|{'|'.join(_FIXED)}|"
              f"iter[1-9][0-9]{{0,9}}_({'|'.join(ITERATION_PHASES)}))$"}

NUMBER = {"type": "number"}
NON_NEGATIVE = {"type": "number", "minimum": 0}
COUNT = {"type": "integer", "minimum": 0}
TEXT = {"type": "string"}
NAME = {"type": "string", "minLength": 1}
BOOL = {"type": "boolean"}

#: A profile (``s2split-profile/1``): unknown keys are refused, so that a
#: misspelt ``unit_cost_ns`` is not silently ignored. Whether a cost key names
#: a known counter is checked by :func:`s2split.estimate.cost.governing_keys`.
FEATURES = {"type": "object", "additionalProperties": False,
            "properties": {f.name: BOOL for f in fields(Features)}}
_CACHE = {"type": "object", "additionalProperties": False,
          "properties": {"size_bytes": {"type": "integer", "minimum": 64},
                         "latency_ns": NON_NEGATIVE}}
#: Where entry reads hit (:func:`s2split.arm64.hierarchy.parse_memory_hierarchy`).
MEMORY_HIERARCHY = {
    "type": "object", "additionalProperties": False,
    "properties": {"line_bytes": {"type": "integer", "minimum": 1}, "l1": _CACHE, "l2": _CACHE,
                   "llc": _CACHE,
                   "dram": {"type": "object", "additionalProperties": False,
                            "properties": {"latency_ns": NON_NEGATIVE}}},
}
PROFILE = {
    "type": "object", "required": ["format", "name"], "additionalProperties": False,
    "properties": {
        "format": {"const": "s2split-profile/1"},
        "name": NAME, "description": TEXT, "provenance": TEXT, "inherits": NAME,
        "features": FEATURES,
        "unit_costs_ns": {"type": "object", "additionalProperties": NON_NEGATIVE},
        "notes": {"type": "array", "items": TEXT},
        # per cost key: a plausible [low, high] (low <= the unit cost <= high,
        # checked by s2split.estimate.cost.check_ranges) and where the value comes from
        "ranges_ns": {"type": "object", "additionalProperties": {
            "type": "array", "minItems": 2, "maxItems": 2, "items": NON_NEGATIVE}},
        "provenance_by_key": {"type": "object", "additionalProperties": NAME},
        "memory_hierarchy": MEMORY_HIERARCHY,
        # how ``calibrate --savings`` fitted it (a record for readers; the
        # model reads only the costs and features)
        "calibration": {"type": "object", "required": ["kind"],
                        "properties": {"kind": {"enum": ["savings"]}}},
    },
}

#: A real-kernel fixture (``s2split-real-kernel-counts/1``). Function names
#: are checked against the model's list by :func:`s2split.tasks.fidelity.load_fixture`.
FIXTURE = {
    "type": "object", "required": ["format", "runs"],
    "properties": {
        "format": {"const": "s2split-real-kernel-counts/1"},
        # read by s2split.tasks.fidelity.describe_fixture; other keys are reported there
        "selftest_variant": TEXT, "kernel_variant": TEXT,
        "missing_functions": {"type": "object", "additionalProperties": TEXT},
        "runs": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["command", "phases"],
            "properties": {
                "label": TEXT, "command": NAME,
                "gpa_range": {"type": "array", "minItems": 2, "maxItems": 2,
                              "items": {"type": ["string", "integer"]}},
                "phases": {"type": "array", "items": {
                    "type": "object", "required": ["phase"],
                    "properties": {
                        "phase": NAME,
                        "calls": {"type": "object", "additionalProperties": COUNT},
                        "detail": {"type": "object", "additionalProperties": {
                            "type": "object", "additionalProperties": {
                                "type": "object",
                                "additionalProperties": COUNT}}},
                    }}},
            }}},
    },
}

#: A measurement row, as ``hw run --json`` writes it and the store keeps it.
MEASUREMENT_CONFIG = {
    "type": "object",
    "properties": {
        "vcpu_memory_bytes": {"type": "integer", "minimum": 1},
        "vcpus": {"type": "integer", "minimum": 1},
        "backing": NAME, "manual_protect": BOOL,
        "iterations": {"type": "integer", "minimum": 1},
        "mode": TEXT, "mode_id": {"type": "integer"},
        "pa_bits": {"type": ["integer", "null"], "minimum": 1},
        "granule": {"enum": [4096, 16384, 65536]},
        "guest_page_size": {"enum": [4096, 16384, 65536]},
        "slots": {"type": "integer", "minimum": 1},
        "write_percent": {"type": "integer", "minimum": 0, "maximum": 100},
        "random_access": BOOL, "partition": BOOL, "seed": {"type": "integer"},
        "chunk_size": {"type": ["integer", "null"], "minimum": 0},
        "seed_synced": BOOL, "arch": {"type": ["string", "null"]},
    },
}
HOST = {"type": "object", "properties": {"page_size": {"enum": [4096, 16384, 65536, None]}}}
MEASUREMENT_ROW = {
    "type": "object",
    "required": ["label", "config_key", "config", "phase", "repetition", "seconds"],
    "properties": {
        "label": NAME, "config_key": NAME, "config": MEASUREMENT_CONFIG, "phase": PHASE_NAME,
        # The same rules on the way in (Store.add_measurements) as on the way
        # out: a time of 0 is refused when imported, since hw compare and
        # calibrate cannot use it.
        "repetition": {"type": "integer", "minimum": 0, "maximum": INT64_MAX},
        "seconds": {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_SECONDS},
        "host": HOST, "source": TEXT,
        # hw run's backing check: the smallest coverage of the test memslots
        "backing": {"type": "object", "required": ["coverage"], "properties": {
            "coverage": {"type": "number", "minimum": 0, "maximum": 1},
            "allow_partial": BOOL, "slots": {"type": "array"}}},
    },
}
HW_RUN = {
    "type": "object", "required": ["format", "rows"],
    "properties": {
        "format": {"const": "s2split-hw-run/1"},
        "label": TEXT, "host": HOST,
        "rows": {"type": "array", "items": MEASUREMENT_ROW},
        "runs": {"type": "array", "items": {
            "type": "object", "properties": {"problems": {"type": "array"}}}},
    },
}

#: The configuration of a stored cell (:meth:`PerfTestParams.to_dict`): the
#: keys that show, compare and export read.
CELL_CONFIG = {
    "type": "object",
    "required": ["vcpu_memory_bytes", "backing", "manual_protect", "iterations", "granule"],
    "properties": {
        **MEASUREMENT_CONFIG["properties"],
        "features": FEATURES,
    },
}


@lru_cache(maxsize=None)
def counts_schema() -> dict:
    """The sparse counts of a stored phase: ``"op/kind/level"`` -> count, with
    names the counter layout knows (an unknown one is refused, not dropped)."""
    import re

    from ..counting.counters import KINDS, OPS
    ops = "|".join(map(re.escape, OPS))
    kinds = "|".join(map(re.escape, KINDS))
    return {"type": "object",
            "propertyNames": {"pattern": f"^({ops})/({kinds})/(-|-1|0|1|2|3)$"},
            "additionalProperties": COUNT}

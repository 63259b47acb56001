"""The cost model: key precedence, profile files, inheritance."""

import json

import numpy as np
import pytest

from s2split.estimate.cost import governing_keys, load_profile
from s2split.counting.counts import Counts
from s2split.plumbing.errors import S2Error


def test_most_specific_key_prices_a_cell(tmp_path):
    f = tmp_path / "p.json"
    f.write_text(json.dumps({
        "format": "s2split-profile/1", "name": "p",
        "unit_costs_ns": {"read_leaf": 1, "read_leaf@3": 2, "split:read_leaf": 4,
                          "split:read_leaf@3": 8}}))
    p = load_profile(str(f))
    assert p.unit_cost("map", "read_leaf", 2) == 1
    assert p.unit_cost("map", "read_leaf", 3) == 2
    assert p.unit_cost("split", "read_leaf", 2) == 4      # op beats level
    assert p.unit_cost("split", "read_leaf", 3) == 8
    assert p.unit_cost("split", "read_table", 2) == 0     # nothing prices it
    # One split read of a level-3 leaf and one map read of a level-2 leaf.
    c = Counts.from_dict({"split/read_leaf/3": 1, "map/read_leaf/2": 1})
    assert p.estimate_ns(c) == 8 + 1


def test_governing_keys_is_order_independent():
    keys = ["split:read_leaf@3", "read_leaf", "split:read_leaf", "read_leaf@3"]
    a = governing_keys(keys, "t")
    b = governing_keys(list(reversed(keys)), "t")
    # Same key (by name) in every cell, whatever the order given.
    names_a = np.array(keys + [""])[a]
    names_b = np.array(list(reversed(keys)) + [""])[b]
    assert (names_a == names_b).all()


def test_inherited_profile_keeps_the_parents_features_and_costs(tmp_path):
    parent = load_profile("server-nvhe-norange")
    (tmp_path / "sub").mkdir()
    base = tmp_path / "sub" / "base.json"
    base.write_text(json.dumps({"format": "s2split-profile/1", "name": "base",
                                "inherits": "server-nvhe-norange",
                                "unit_costs_ns": {"read_leaf": 99}}))
    child = tmp_path / "sub" / "child.json"
    # A relative "inherits" path is relative to the inheriting file.
    child.write_text(json.dumps({"format": "s2split-profile/1", "name": "child",
                                 "inherits": "base.json", "features": {"dic": True}}))
    p = load_profile(str(child))
    assert p.features == type(parent.features)(**{**vars(parent.features), "dic": True})
    assert p.unit_costs_ns == {**parent.unit_costs_ns, "read_leaf": 99.0}


@pytest.mark.parametrize("content,needle", [
    ("{", "not readable JSON"),
    ('{"format": "other"}', "not an s2split profile"),
    ('{"format": "s2split-profile/1"}', "malformed profile"),
    ('{"format": "s2split-profile/1", "name": "n", "unit_costs_ns": {"nope": 1}}',
     "unknown counter"),
    ('{"format": "s2split-profile/1", "name": "n", "unit_costs_ns": {"read_leaf": -1}}',
     "non-negative"),
    ('{"format": "s2split-profile/1", "name": "n", "features": {"warp": true}}',
     "malformed profile"),
])
def test_bad_profiles_are_one_line_errors(tmp_path, content, needle):
    f = tmp_path / "bad.json"
    f.write_text(content)
    with pytest.raises(S2Error, match=needle) as e:
        load_profile(str(f))
    assert "\n" not in str(e.value)

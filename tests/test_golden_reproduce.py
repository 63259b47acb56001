"""``s2split reproduce --json`` on a 1 GiB matrix is byte-for-byte what it was
before the fast engine was split into modules (tests/golden/reproduce-1G.json,
produced by the single-file engine of 0.2.0; every number in it is pinned).

One cell, checked by hand: clear / THP / 4K, skip-levels saves exactly 40% of
the entries read. Mode 6 (P40V48_4K) walks from level 1; the 1 GiB of THP is
512 level-2 blocks of 2 MiB; each bitmap word is 64 pages (256 KiB), so 8
words per block, and each word write-protects then splits its own range.

* Iteration 1, a block's first word: write-protect reads the level-1 table
  entry and the block (2); split reads the same 2, builds the level-3 table
  (create_unlinked reads its 512 empty entries) and -- vanilla only --
  descends and reads the word's 64 new pages. Its other 7 words find the
  table: write-protect reads 2 + 64 each, split 2 + 64 (vanilla) or 2.
  vanilla: 2 + 7 * 66 + 8 * 66 + 512 = 1504; skip-levels: 464 + 16 + 512 = 992.
* Iteration 2 (the guest wrote every page again): 8 words, each 66 to
  write-protect and 66 (vanilla) or 2 to split: 1056 against 544.

Per block 2560 against 1536 entries read: (2560 - 1536) / 2560 = 40.0%.
"""

import json
from pathlib import Path

from _cli import run_cli

GOLDEN = Path(__file__).parent / "golden" / "reproduce-1G.json"


def _contains(got, want, where="") -> None:
    """Every key and number of ``want`` is in ``got`` unchanged; ``got`` may
    have more keys (fields added since, such as the savings' intervals)."""
    if isinstance(want, dict):
        assert isinstance(got, dict), where
        for k, v in want.items():
            assert k in got, f"{where}/{k} missing"
            _contains(got[k], v, f"{where}/{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (a, b) in enumerate(zip(got, want)):
            _contains(a, b, f"{where}[{i}]")
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def test_golden_check_catches_a_changed_number():
    want = {"rows": [{"time_saved_pct": {"4K": 15.0}}]}
    _contains({"rows": [{"time_saved_pct": {"4K": 15.0}, "new": 1}]}, want)
    try:
        _contains({"rows": [{"time_saved_pct": {"4K": 15.000001}}]}, want)
    except AssertionError:
        return
    raise AssertionError("a changed number went through")


def test_reproduce_json_is_unchanged(capsys, tmp_path):
    code, out, err = run_cli(["reproduce", "--json", "--size", "1G", "--workers", "1",
                              "--db", str(tmp_path / "r.sqlite")], capsys)
    assert code == 0, err
    got = json.loads(out)
    got.pop("elapsed_s")
    want = json.loads(GOLDEN.read_text())
    _contains(got, want)
    # The keys added since the golden file: intervals beside every estimate.
    for row in got["rows"]:
        for end in ("low", "high"):
            assert set(row[f"time_saved_pct_{end}"]) == set(row["time_saved_pct"])
    cell = next(r for r in got["rows"] if (r["scenario"], r["backing"], r["variant"])
                == ("clear", "thp", "skip-levels"))
    assert cell["reads_saved_pct"]["4K"] == 100 * (2560 - 1536) / 2560

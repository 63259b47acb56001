"""``s2split reproduce``: the experiment matrix of the patch series.

A 64 GiB VM (1 vCPU, 1 memslot, 40-bit IPA) for every granule x backing x
scenario, each run under every variant. The two scenarios are the two
syscalls that split: (1) ``KVM_CLEAR_DIRTY_LOG`` with manual-protect +
initially-set, over the test's iterations, and (2) enabling dirty logging
without manual-protect. A *group* (granule, backing, scenario) is one
:func:`~s2split.workload.run_variants` call -- the variants share the phases
they cannot change -- and yields one *cell* per variant, stored in one
transaction each. Groups run in parallel processes, or on a Dask cluster.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from s2split import __version__
from ..arm64.arch import GRANULES, granule_name, pmd_size, size_name
from ..arm64.features import Features
from ..counting.counts import Counts, sum_counts
from ..engine import engine_name
from ..estimate.cost import Profile, load_profile
from ..model.pgtable.variants import DEFAULT_VARIANTS, get as get_variant
from ..plumbing.errors import S2Error
from ..selftest.modes import mode_for
from ..workload import PerfTestParams, run_variants

BACKINGS = {"regular": "anonymous", "thp": "anonymous_thp", "hugetlb": "anonymous_hugetlb"}
BACKING_LABELS = {"regular": "regular pages", "thp": "THP", "hugetlb": "hugetlb"}
SCENARIOS = {
    "clear": "KVM_CLEAR_DIRTY_LOG (manual-protect + initially-set), all iterations",
    "enable": "enabling dirty logging (no manual-protect)",
}


def syscall_phases(scenario: str, iterations: int) -> list[str]:
    if scenario == "enable":
        return ["enable_dirty_logging"]
    return [f"iter{i}_clear_dirty_log" for i in range(1, iterations + 1)]


@dataclass(frozen=True)
class Matrix:
    size: int = 64 << 30
    granules: tuple[int, ...] = (4096, 16384, 65536)
    backings: tuple[str, ...] = ("regular", "thp", "hugetlb")
    scenarios: tuple[str, ...] = ("clear", "enable")
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    chunk: int | None = None  # None: the PMD block size of each granule
    iterations: int = 2
    ipa_bits: int = 40
    hugetlb_1g: bool = False
    profile: str = "server-vhe"
    cpu: str | None = None  # --cpu: changes to the profile's CPU features

    def features(self, profile: Profile) -> "Features":
        """The CPU features of the runs: the profile's, changed by ``cpu``."""
        return Features.parse(self.cpu, base=profile.features) if self.cpu else profile.features

    def __post_init__(self) -> None:
        for b in self.backings:
            if b not in BACKINGS:
                raise S2Error(f"unknown backing {b!r}: choose from {', '.join(BACKINGS)}")
        for s in self.scenarios:
            if s not in SCENARIOS:
                raise S2Error(f"unknown scenario {s!r}: choose from {', '.join(SCENARIOS)}")
        for g in self.granules:
            if g not in GRANULES:
                raise S2Error(f"unknown granule {g}")
        if "vanilla" not in self.variants:
            raise S2Error("the variants must include vanilla (savings are against it)")
        for v in self.variants:
            get_variant(v)
        if not self.granules or not self.backings or not self.scenarios:
            raise S2Error("the matrix is empty")
        if self.size <= 0:
            raise S2Error(f"--size must be greater than 0, got {self.size}")
        if self.hugetlb_1g and 4096 not in self.granules:
            raise S2Error("--hugetlb-1g: 1G hugetlb pages exist only with 4K pages, and "
                          "--granule has no 4K")
        if self.hugetlb_1g and "hugetlb" not in self.backings:
            raise S2Error("--hugetlb-1g: --backing has no hugetlb")

    def check_layouts(self, features: Features) -> None:
        """memstress's checks of every group (before the results store is
        opened), worded for reproduce's options."""
        from ..workload import memstress_layout
        for g in self.groups(features):
            try:
                memstress_layout(g.params)
            except S2Error as e:
                text = str(e)
                if text.startswith("-b"):
                    text = "--size" + text[2:]
                raise S2Error(text) from None

    def chunk_for(self, granule: int) -> int:
        if self.chunk is not None:
            return self.chunk
        return pmd_size(granule)

    def params(self, granule: int, backing: str, scenario: str,
               features: Features) -> PerfTestParams:
        name = BACKINGS[backing]
        if backing == "hugetlb" and self.hugetlb_1g and granule == 4096:
            name = "anonymous_hugetlb_1gb"
        try:
            return self._params(granule, name, scenario, features)
        except S2Error as e:
            text = str(e)
            raise S2Error("--size" + text[2:] if text.startswith("-b") else text) from None

    def _params(self, granule: int, name: str, scenario: str,
                features: Features) -> PerfTestParams:
        return PerfTestParams(vcpu_memory_bytes=self.size, backing=name,
                              manual_protect=scenario == "clear", iterations=self.iterations,
                              mode=mode_for(granule, self.ipa_bits),
                              chunk_size=self.chunk_for(granule), features=features)

    def groups(self, features: Features) -> list["Group"]:
        out = []
        for g in self.granules:
            for b in self.backings:
                for s in self.scenarios:
                    out.append(Group(g, b, s, self.params(g, b, s, features), self.variants))
        # Largest first: 4K groups do the most work, so start them early.
        return sorted(out, key=lambda gr: (-(gr.params.vcpu_memory_bytes // gr.granule),
                                           gr.backing, gr.scenario))


@dataclass(frozen=True)
class Group:
    granule: int
    backing: str
    scenario: str
    params: PerfTestParams
    variants: tuple[str, ...]

    @property
    def label(self) -> str:
        return f"{granule_name(self.granule)} {self.backing} {self.scenario}"


def cell_key(params: PerfTestParams, variant: str) -> str:
    """Identifies a cell: the configuration, the variant and the tool version
    (counts depend on nothing else; estimates are recomputed per profile)."""
    from ..model.pgtable.variants import definition, get
    text = json.dumps({"params": params.to_dict(), "variant": variant,
                       "definition": definition(get(variant)), "version": __version__},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def profile_option(profile: Profile) -> str:
    """What ``--profile`` must say to load ``profile`` again: a built-in's name,
    or the path of a profile file (its name alone would not load)."""
    if profile.source and not profile.source.startswith("builtin:"):
        return profile.source
    return profile.name


def reproduce_command(params: PerfTestParams, variant: str, profile: str) -> str:
    """``profile`` is a ``--profile`` argument (see :func:`profile_option`)."""
    import shlex
    argv = params.argv()
    return "s2split perf-test " + " ".join(argv) + f" --variant {variant}" + \
        (f" --profile {shlex.quote(profile)}" if profile != "server-vhe" else "")


# -- execution ----------------------------------------------------------------------

def run_group(params: PerfTestParams, variants: tuple[str, ...],
              engine: str) -> list[dict[str, Any]]:
    """Run one group (in a worker): picklable results, one dict per variant."""
    results = run_variants(params, [get_variant(v) for v in variants], engine)
    return [{"variant": r.variant, "engine": r.engine, "seconds": r.seconds,
             "phases": [(name, c.array.reshape(-1)) for name, c in r.phases]} for r in results]


def compile_engine(workers: int) -> None:
    """Compile the fast engine's kernels (or find them in the cache) before
    forking workers, so that they do not each compile them; with two
    workers or more, two processes share the compiling."""
    from ..engine.compile_cache import ensure_compiled
    ensure_compiled(parallel=workers > 1)


class LocalExecutor:
    """Groups in a pool of local processes (:class:`s2split.plumbing.workers.Pool`:
    errors come back whole, a dead worker is an error, not a hang, and no
    worker outlives the main process)."""

    def __init__(self, workers: int | None = None):
        self.workers = workers or os.cpu_count() or 1

    def run(self, tasks: list[tuple[Group, str]]) -> Iterator[tuple[Group, Any]]:
        if self.workers <= 1 or len(tasks) <= 1:
            for group, engine in tasks:
                yield group, run_group(group.params, group.variants, engine)
            return
        from ..plumbing.workers import Pool
        yield from Pool(self.workers).run(
            run_group, [(g, (g.params, g.variants, eng)) for g, eng in tasks])


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


class DaskExecutor:
    """Groups on a Dask distributed cluster (``--dask tcp://host:8786``)."""

    def __init__(self, address: str):
        try:
            from distributed import Client
        except ImportError:
            raise S2Error("--dask needs the 'distributed' package: pip install "
                          "'s2split[dask]'") from None
        self.address = address
        try:
            self.client = Client(address, timeout="10s")
        except (OSError, TimeoutError) as e:
            raise S2Error(f"cannot reach the Dask scheduler at {address}: {e}") from None
        except ValueError as e:  # malformed address: no port, unknown scheme...
            raise S2Error(f"bad Dask scheduler address {address!r}: {e}") from None
        except Exception as e:  # noqa: BLE001 - tls:// without certificates, ucx:// without UCX...
            raise S2Error(f"cannot connect to the Dask scheduler at {address} "
                          f"({_first_line(e)})") from None

    def close(self) -> None:
        try:
            if self.client.status not in ("closed", "closing"):
                self.client.close()
        except Exception:  # noqa: BLE001 - the scheduler is gone already
            pass

    def run(self, tasks: list[tuple[Group, str]]) -> Iterator[tuple[Group, Any]]:
        from distributed import as_completed
        futures = {self.client.submit(run_group, g.params, g.variants, eng, pure=False): g
                   for g, eng in tasks}
        try:
            for fut in as_completed(list(futures)):
                try:
                    result = fut.result()
                except (S2Error, KeyboardInterrupt):
                    raise  # the model's own error (sent back by the worker), or Ctrl-C
                except BaseException as e:  # noqa: BLE001 - a lost scheduler or worker
                    raise S2Error(f"the Dask cluster at {self.address} failed while running "
                                  f"{futures[fut].label} ({_first_line(e)}); the cells stored "
                                  "so far are kept: run the command again to resume") from None
                yield futures[fut], result
        finally:
            try:
                self.client.close()
            except Exception:  # noqa: BLE001 - closing a client whose scheduler is gone
                pass


@dataclass
class Outcome:
    """What a reproduce run computed or found: cells by (granule, backing, scenario, variant)."""

    matrix: Matrix
    profile: Profile
    cells: dict[tuple[int, str, str, str], dict[str, Counts]] = field(default_factory=dict)
    params: dict[tuple[int, str, str], PerfTestParams] = field(default_factory=dict)
    ran: int = 0
    skipped: int = 0

    def phase_counts(self, granule: int, backing: str, scenario: str,
                     variant: str) -> Counts:
        """Counts of the scenario's syscall phases, summed."""
        cell = self.cells[(granule, backing, scenario, variant)]
        return sum_counts(cell[name] for name in syscall_phases(scenario, self.matrix.iterations))


def reproduce(matrix: Matrix, store: Any, engine: str = "auto", executor: Any = None,
              progress: Callable[[str, int, int], None] | None = None) -> Outcome:
    """Run every group with a missing cell, store each cell, and return all cells."""
    profile = load_profile(matrix.profile)
    outcome = Outcome(matrix, profile)
    groups = matrix.groups(matrix.features(profile))
    todo = []
    for g in groups:
        outcome.params[(g.granule, g.backing, g.scenario)] = g.params
        if all(store.has_cell(cell_key(g.params, v)) for v in g.variants):
            outcome.skipped += len(g.variants)
        else:
            todo.append(g)
    engines = {g.label: engine_name(engine, g.params, [get_variant(v) for v in g.variants])
               for g in todo}
    total = len(groups)
    done = total - len(todo)
    if progress:
        progress("", done, total)
    if todo:
        local = executor is None or isinstance(executor, LocalExecutor)
        executor = executor or LocalExecutor()
        if local and "fast" in engines.values():
            compile_engine(min(executor.workers, len(todo)))
        for group, results in executor.run([(g, engines[g.label]) for g in todo]):
            for r in results:
                key = cell_key(group.params, r["variant"])
                counts = [(name, Counts.from_flat(np.asarray(flat))) for name, flat in r["phases"]]
                phases = [(name, c, profile.estimate_ns(c)) for name, c in counts]
                if store.has_cell(key):
                    # Stored by the interrupted run this one resumes (a group
                    # it left half-written), or by a concurrent run.
                    outcome.skipped += 1
                else:
                    store.add_cell(key, group.params.to_dict(), r["variant"], r["engine"],
                                   profile.name, r["seconds"], phases)
                    outcome.ran += 1
            done += 1
            if progress:
                progress(group.label, done, total)
    for g in groups:
        for v in g.variants:
            stored = next(store.cells("WHERE key = ?", (cell_key(g.params, v),)))
            outcome.cells[(g.granule, g.backing, g.scenario, v)] = \
                {n: c for n, c, _ in stored.phases}
    return outcome


def matrix_summary(m: Matrix) -> str:
    return (f"{size_name(m.size)} VM, 1 vCPU, 1 memslot, {m.ipa_bits}-bit IPA; granules "
            f"{', '.join(granule_name(g) for g in m.granules)}; backings "
            f"{', '.join(m.backings)}{' (1G hugetlb on 4K)' if m.hugetlb_1g else ''}; "
            f"scenarios {', '.join(m.scenarios)}; variants {', '.join(m.variants)}; chunk "
            f"{size_name(m.chunk) if m.chunk else 'PMD block size'}; {m.iterations} iterations")


__all__ = ["Matrix", "reproduce", "Outcome", "cell_key", "reproduce_command", "profile_option",
           "syscall_phases",
           "LocalExecutor", "DaskExecutor", "run_group"]

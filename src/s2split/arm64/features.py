"""CPU features that change what the stage-2 code does (not how fast it is).

These are the profile switches of the brief: they decide *which* maintenance
the kernel performs, so they change counts. How long each event takes is the
cost model's business (:mod:`s2split.estimate.cost`). Numpy-free: the model core and the
harness share it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..plumbing.errors import S2Error


@dataclass(frozen=True)
class Features:
    """Host CPU features visible to KVM's stage-2 code.

    * ``vhe``: KVM runs at EL2 with the host (VHE); otherwise every hyp TLB
      function is a hypercall (nVHE), counted as ``hyp_call``.
    * ``fwb``: FEAT_S2FWB; no D-cache maintenance when mapping or unmapping,
      different MemAttr encodings.
    * ``tlbirange``: FEAT_TLBIRANGE; range TLBIs instead of whole-VMID ones, and
      (with FWB) unmap defers its per-entry TLBIs to one range flush.
    * ``dic``: CTR_EL0.DIC; KVM then maps guest memory executable by default.
    * ``bbml2``: FEAT_BBM level 2 with the NOABORT property
      (``ARM64_HAS_BBML2_NOABORT``): a block may be replaced by a table of the
      same translation without a break. Linux 6.12's stage-2 code does not use
      it; the ``bbml2`` variants need it. Off unless a profile or ``--cpu
      +bbml2`` says so, and then left out of :meth:`as_dict`, :meth:`spec` and
      :meth:`describe`, so that runs without it keep their keys and texts.
    * ``ampere_ac04_cpu_23`` (``--cpu +ampere-ac04-cpu-23``): the CPU has
      AmpereOne's erratum AC04_CPU_23 and the kernel works around it (6.16+,
      ``CONFIG_AMPERE_ERRATUM_AC04_CPU_23``): every write of HCR_EL2 becomes
      DSB NSH; MSR; ISB. On VHE each hyp TLB call writes HCR_EL2 twice
      (:func:`s2split.arm64.rules.hcr_erratum_barriers`). An erratum is a CPU
      feature like ``bbml2``: off unless named, and then left out of the
      keys and texts.

    The defaults are the features of the default profile (``server-vhe``).
    """

    vhe: bool = True
    fwb: bool = True
    tlbirange: bool = True
    dic: bool = True
    bbml2: bool = False
    ampere_ac04_cpu_23: bool = False

    def as_dict(self) -> dict[str, bool]:
        """The features by name (``bbml2`` and errata only when on)."""
        d = asdict(self)
        for name in _OPTIONAL:
            if not d[name]:
                del d[name]
        return d

    def describe(self) -> str:
        return ", ".join(f"{_spell(k)}={'on' if v else 'off'}" for k, v in self.as_dict().items())

    def spec(self) -> str:
        """The ``--cpu`` text naming every feature: ``"vhe,-fwb,..."``."""
        return ",".join(("" if v else "-") + _spell(k) for k, v in self.as_dict().items())

    @classmethod
    def parse(cls, text: str, base: "Features | None" = None) -> "Features":
        """``"vhe,fwb,-tlbirange,+bbml2"``: a name or ``+name`` switches a
        feature on, ``-name`` off; features not named keep their value in
        ``base`` (default: the defaults)."""
        values = asdict(base or cls())
        for token in filter(None, (t.strip() for t in text.split(","))):
            on = not token.startswith(("-", "no-"))
            name = token.removeprefix("+") if on else token.lstrip("-").removeprefix("no-")
            name = name.replace("-", "_")
            if name not in values:
                raise S2Error(f"unknown CPU feature {_spell(name)!r}: choose from "
                              f"{', '.join(map(_spell, values))}")
            values[name] = on
        return cls(**values)


#: CPU errata whose kernel workarounds change what the stage-2 code executes,
#: by their ``--cpu`` names; which kernels have each: versions.KernelRules.errata.
ERRATA = ("ampere-ac04-cpu-23",)
#: Features left out of keys and texts while off (runs without them keep theirs).
_OPTIONAL = ("bbml2", *(e.replace("-", "_") for e in ERRATA))


def _spell(field_name: str) -> str:
    """A feature's name as ``--cpu`` spells it (errata with dashes)."""
    dashed = field_name.replace("_", "-")
    return dashed if dashed in ERRATA else field_name

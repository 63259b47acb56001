"""Time estimates from counts: hardware profiles (``profiles/``), the cost
model pricing each counter (:mod:`.cost`) and exact intervals of a saving
over a profile's ranges (:mod:`.intervals`). Every time printed from here is
an estimate under a named profile, never a measurement."""

"""Calling a visitor compiled apart from the engine, through its address.

A user's visitor (:mod:`s2split.model.pgtable.visitor_api`) is compiled when its
variant is first used, as a C-callable function (:func:`numba.cfunc`) whose
address goes into ``M``. The cached walker calls it through
:func:`call_visitor_ptr`, an indirect call: the engine's compile cache never
holds a user's code (only an address, which is data and set afresh in every
process), and the built-in path is compiled and cached exactly as before.

The C signature (:data:`C_SIGNATURE`) passes the two arrays as pointer and
shape, then the visit's five integers: ``(T, rows, cols, M, len, pfn, idx,
old, level, visit) -> int64``.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

_I64P = types.CPointer(types.int64)
#: The C signature of a compiled visitor or hook.
C_SIGNATURE = types.int64(_I64P, types.int64, types.int64, _I64P, types.int64, types.int64,
                          types.int64, types.int64, types.int64, types.int64)


@intrinsic
def call_visitor_ptr(typingctx, addr, T, M, pfn, idx, old, level, visit):
    """Call the visitor at address ``addr`` with ``(T, M, pfn, idx, old, level, visit)``."""
    scalars = (addr, pfn, idx, old, level, visit)
    if not all(isinstance(t, types.Integer) for t in scalars):
        return None
    sig = types.int64(addr, T, M, pfn, idx, old, level, visit)

    def codegen(context, builder, signature, args):
        i64 = ir.IntType(64)
        tys = signature.args
        ints = [context.cast(builder, args[k], tys[k], types.int64) for k in (0, 3, 4, 5, 6, 7)]
        t = context.make_array(tys[1])(context, builder, args[1])
        m = context.make_array(tys[2])(context, builder, args[2])
        rows, cols = cgutils.unpack_tuple(builder, t.shape, 2)
        (mlen,) = cgutils.unpack_tuple(builder, m.shape, 1)
        fnty = ir.FunctionType(i64, [i64.as_pointer(), i64, i64, i64.as_pointer(), i64,
                                     i64, i64, i64, i64, i64])
        fn = builder.inttoptr(ints[0], fnty.as_pointer())
        return builder.call(fn, [builder.bitcast(t.data, i64.as_pointer()), rows, cols,
                                 builder.bitcast(m.data, i64.as_pointer()), mlen, *ints[1:]])

    return sig, codegen

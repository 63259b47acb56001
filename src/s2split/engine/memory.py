"""Table pages and memory caches in the fast engine: the twin of
:mod:`s2split.model.pgtable.memory`.

Table memory is the rows of ``T``, handed out by a bump pointer and a free
stack (last freed, first reused, as the reference's allocator), with a
reference count per page in ``M``. A memory cache is a stack of page
numbers: one per vCPU (id = the vCPU's index, capacity
``KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE``) and the split cache (``MC_SPLIT``).
"""

from __future__ import annotations

from numba import njit

from ..counting.counters import K_GET_PAGE, K_PAGE_FREED, K_PUT_PAGE
from ..model.kvm.mmu import VCPU_CACHE_CAPACITY
from .state import MC_SPLIT, S, count


@njit(cache=True, _nrt=False)
def mem_alloc(T, M):
    """``TableMemory.alloc``: a zeroed table page holding one reference."""
    if M[S.FREE_TOP] > 0:
        M[S.FREE_TOP] -= 1
        pfn = M[M[S.FREE_STACK] + M[S.FREE_TOP]]
    else:
        pfn = M[S.NEXT_PAGE]
        # FastVM sizes table memory for the worst case; running out means that
        # bound is wrong, and carrying on would write over the last page.
        assert pfn < M[S.CAPACITY], "fast engine: table memory exhausted"
        M[S.NEXT_PAGE] += 1
    T[pfn, :] = 0
    M[M[S.REFCOUNT] + pfn] = 1
    return pfn


@njit(cache=True, _nrt=False)
def mem_free(M, pfn):
    """``TableMemory.free``: back on the free stack."""
    M[M[S.REFCOUNT] + pfn] = 0
    M[M[S.FREE_STACK] + M[S.FREE_TOP]] = pfn
    M[S.FREE_TOP] += 1


@njit(cache=True, _nrt=False)
def mem_put(M, pfn):
    """``TableMemory.put``: drop a reference, uncounted; True if that freed the page."""
    r = M[S.REFCOUNT] + pfn
    M[r] -= 1
    if M[r] == 0:
        mem_free(M, pfn)
        return True
    return False


@njit(cache=True, _nrt=False)
def get_page(M, op, pfn, level):
    """``mm_ops->get_page()`` on a table page at ``level``, counted."""
    M[M[S.REFCOUNT] + pfn] += 1
    count(M, op, K_GET_PAGE, level, 1)


@njit(cache=True, _nrt=False)
def put_page(M, op, pfn, level):
    """``mm_ops->put_page()`` on a table page at ``level``, counted (freed at zero)."""
    count(M, op, K_PUT_PAGE, level, 1)
    if mem_put(M, pfn):
        count(M, op, K_PAGE_FREED, level, 1)


@njit(cache=True, _nrt=False)
def cache_nobjs(M, mc):
    """``MemoryCache.nobjs``: pages held by cache ``mc`` (none without a cache)."""
    if mc == MC_SPLIT:
        return M[S.SPLIT_NOBJS]
    if mc < 0:
        return 0
    return M[M[S.VCPU_NOBJS] + mc]


@njit(cache=True, _nrt=False)
def cache_alloc(M, mc):
    """``kvm_mmu_memory_cache_alloc()``: last in, first out; -1 when empty."""
    if mc == MC_SPLIT:
        if M[S.SPLIT_NOBJS] == 0:
            return -1
        M[S.SPLIT_NOBJS] -= 1
        return M[M[S.SPLIT_CACHE] + M[S.SPLIT_NOBJS]]
    if mc < 0:
        return -1
    n = M[S.VCPU_NOBJS] + mc
    if M[n] == 0:
        return -1
    M[n] -= 1
    return M[M[S.VCPU_CACHE] + mc * VCPU_CACHE_CAPACITY + M[n]]


@njit(cache=True, _nrt=False)
def cache_topup(T, M, mc, capacity, minimum):
    """``__kvm_mmu_topup_memory_cache()``: fill to capacity when below minimum;
    the pages added."""
    if cache_nobjs(M, mc) >= minimum:
        return 0
    added = 0
    if mc == MC_SPLIT:
        if M[S.SPLIT_CAPACITY] == 0:
            M[S.SPLIT_CAPACITY] = capacity
        while M[S.SPLIT_NOBJS] < M[S.SPLIT_CAPACITY]:
            M[M[S.SPLIT_CACHE] + M[S.SPLIT_NOBJS]] = mem_alloc(T, M)
            M[S.SPLIT_NOBJS] += 1
            added += 1
    else:
        n = M[S.VCPU_NOBJS] + mc
        while M[n] < capacity:
            M[M[S.VCPU_CACHE] + mc * VCPU_CACHE_CAPACITY + M[n]] = mem_alloc(T, M)
            M[n] += 1
            added += 1
    return added


@njit(cache=True, _nrt=False)
def cache_free_all(T, M, mc):
    """``kvm_mmu_free_memory_cache()``: free every page held; the pages freed."""
    freed = 0
    while True:
        pfn = cache_alloc(M, mc)
        if pfn < 0:
            break
        mem_put(M, pfn)
        freed += 1
    if mc == MC_SPLIT:
        M[S.SPLIT_CAPACITY] = 0
    return freed

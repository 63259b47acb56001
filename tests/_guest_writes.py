"""The pages a memstress guest writes, from first principles, for the tests
that check real dirty bitmaps (an independent path: the harness's guest code
and the model's ``memstress`` module are not used)."""


def park_miller(x: int) -> int:
    """The selftests' guest random generator, written out again here."""
    return x * 48271 % 2147483647


def written_pages(seed: int, pages: int, passes: list[tuple[int, bool]]) -> list[set]:
    """Pages (relative to the vCPU's region) one vCPU writes in each pass of
    (write percent, random access)."""
    out, x = [], seed
    for write_percent, random_access in passes:
        s = set()
        for i in range(pages):
            page = i
            if random_access:
                x = park_miller(x)
                page = x % pages
            x = park_miller(x)
            if x % 100 < write_percent:
                s.add(page)
        out.append(s)
    return out

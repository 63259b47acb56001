#!/bin/bash
# Check that the dirty_log_perf_test patch applies to a kernel source tarball
# and that the KVM selftests build with it, cross-compiled for arm64.
#
#   contrib/check_selftest_patch.sh [TARBALL [WORKDIR]]
#
# TARBALL: a Linux source tarball (default: Debian's linux-source-7.3,
# /usr/src/linux-source-7.3.tar.xz). WORKDIR (default: a new temporary
# directory) receives only the paths the selftests' build needs: the top
# Makefile and Kbuild files, scripts/, include/, usr/, arch/arm64/ and tools/.
# Needs: tar, xz, patch, make, a host gcc, and aarch64-linux-gnu-gcc
# (Debian: apt-get install gcc-aarch64-linux-gnu); on an arm64 host the
# native gcc is used instead.
#
# It prints each step and ends with one line: what applied and what built.
# Exit status: 0 all good, 1 a step failed (the step is named).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
patch_file=$here/dirty_log_perf_test-eager-split-chunk-size.patch
tarball=${1:-/usr/src/linux-source-7.3.tar.xz}
work=${2:-$(mktemp -d)}
jobs=${JOBS:-2}

fail() { echo "check_selftest_patch: $*" >&2; exit 1; }

[ -f "$tarball" ] || fail "no tarball at $tarball (Debian: apt-get install linux-source-7.3)"
[ -f "$patch_file" ] || fail "no patch at $patch_file"
if [ "$(uname -m)" = aarch64 ]; then
    cross=""
else
    cross=aarch64-linux-gnu-
    command -v ${cross}gcc >/dev/null ||
        fail "no ${cross}gcc (Debian: apt-get install gcc-aarch64-linux-gnu)"
fi

# head closes the pipe early: tar's SIGPIPE is expected, not a failure.
top=$(tar -tJf "$tarball" | head -1 | cut -d/ -f1 || true)
[ -n "$top" ] || fail "cannot list $tarball"
echo "== unpacking the selftests' build inputs of $top into $work"
mkdir -p "$work"
tar -xJf "$tarball" -C "$work" --wildcards \
    "$top/Makefile" "$top/Kbuild" "$top/Kconfig" "$top/scripts/*" "$top/include/*" \
    "$top/usr/*" "$top/arch/arm64/*" "$top/tools/*"
src=$work/$top

echo "== applying $(basename "$patch_file")"
if patch -d "$src" -p1 -R --dry-run --silent < "$patch_file" >/dev/null 2>&1; then
    echo "already applied"
else
    patch -d "$src" -p1 --no-backup-if-mismatch < "$patch_file" || fail "the patch does not apply"
fi

echo "== installing the arm64 UAPI headers (make headers)"
make -s -C "$src" ARCH=arm64 CROSS_COMPILE=$cross headers >/dev/null ||
    fail "make headers failed"

echo "== building the KVM selftests for arm64"
log=$work/selftests-build.log
if make -C "$src/tools/testing/selftests/kvm" ARCH=arm64 CROSS_COMPILE=$cross -j"$jobs" \
        >"$log" 2>&1; then
    built=all
else
    # Some other test may not build with this toolchain; the one that matters
    # is dirty_log_perf_test, with the library it links.
    echo "(the whole suite did not build; see $log) building dirty_log_perf_test alone"
    make -C "$src/tools/testing/selftests/kvm" ARCH=arm64 CROSS_COMPILE=$cross \
        -j"$jobs" "$src/tools/testing/selftests/kvm/dirty_log_perf_test" >>"$log" 2>&1 ||
        fail "dirty_log_perf_test does not build; see $log"
    built=dirty_log_perf_test
fi
bin=$src/tools/testing/selftests/kvm/dirty_log_perf_test
[ -x "$bin" ] || fail "no $bin after the build"
case "$(file "$bin")" in
    *"ARM aarch64"*) ;;
    *) fail "$bin is not an arm64 executable" ;;
esac
grep -qa -- "-k: enable KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE" "$bin" ||
    fail "$bin lacks the -k help text: the patch is not in it"
# The patched files must compile without a warning.
if grep -E "(dirty_log_perf_test|kvm_util)\.[ch]:[0-9]+:[0-9]+: (warning|error)" "$log"; then
    fail "the patched files compile with warnings (above)"
fi
echo "OK: the patch applies to $top and the KVM selftests ($built) build for arm64: $bin"

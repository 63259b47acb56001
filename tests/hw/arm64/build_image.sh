#!/usr/bin/env bash
# Fetch what the arm64 emulation test boots: Debian's arm64 kernel and an
# initramfs holding Debian's arm64 Python (no s2split: the test adds it).
#
#   tests/hw/arm64/build_image.sh            # -> $S2SPLIT_HW_CACHE/arm64/{Image,base.cpio}
#
# Idempotent: a finished image (the "done" stamp) is reused; partial downloads
# are resumed by apt. Needs: apt-get, dpkg-deb, python3, gzip (all on Debian);
# it does not change the host's dpkg or apt configuration (a private apt
# directory under the cache holds Debian's arm64 package lists).
#
# Environment:
#   S2SPLIT_HW_CACHE   cache directory (default: <repo>/.hw-cache)
#   S2SPLIT_HW_SUITE   Debian suite (default: trixie, whose kernel is 6.12)
#   S2SPLIT_HW_MIRROR  Debian mirror (default: http://deb.debian.org/debian)
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../../.." && pwd)"
cache="${S2SPLIT_HW_CACHE:-$repo/.hw-cache}/arm64"
suite="${S2SPLIT_HW_SUITE:-trixie}"
mirror="${S2SPLIT_HW_MIRROR:-http://deb.debian.org/debian}"
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
format=2  # bump when the image contents change
stamp="$cache/done-$suite-$format"

if [[ -f "$stamp" && -f "$cache/Image" && -f "$cache/base.cpio" ]]; then
    echo "arm64 image: cached in $cache ($(cat "$stamp"))"
    exit 0
fi

for tool in apt-get apt-cache dpkg-deb python3 gzip; do
    command -v "$tool" >/dev/null || { echo "build_image.sh: $tool is missing" >&2; exit 1; }
done
[[ -r "$keyring" ]] || { echo "build_image.sh: $keyring is missing (apt-get install debian-archive-keyring)" >&2; exit 1; }

aptroot="$cache/apt"
mkdir -p "$aptroot/etc/apt/apt.conf.d" "$aptroot/etc/apt/preferences.d" \
         "$aptroot/etc/apt/sources.list.d" "$aptroot/var/lib/apt/lists/partial" \
         "$aptroot/var/cache/apt/archives/partial" "$aptroot/var/lib/dpkg" "$cache/debs"
touch "$aptroot/var/lib/dpkg/status"
echo "deb [arch=arm64 signed-by=$keyring] $mirror $suite main" > "$aptroot/etc/apt/sources.list"
aptopts=(-q -o "Dir=$aptroot" -o "Dir::State::status=$aptroot/var/lib/dpkg/status"
         -o "Dir::Bin::Methods=/usr/lib/apt/methods" -o "APT::Architecture=arm64"
         -o "APT::Architectures::=arm64" -o "APT::Sandbox::User=root"
         -o "Debug::NoLocking=1" -o "Acquire::Retries=3")

echo "arm64 image: package lists of Debian $suite (arm64)"
apt-get "${aptopts[@]}" update >/dev/null

# The kernel: the package the linux-image-arm64 metapackage points at.
kpkg="$(apt-cache "${aptopts[@]}" depends linux-image-arm64 |
        sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-arm64\)$/\1/p' | head -1)"
[[ -n "$kpkg" ]] || { echo "build_image.sh: no linux-image-*-arm64 in $suite" >&2; exit 1; }
pyver="$(apt-cache "${aptopts[@]}" depends python3-minimal |
         sed -n "s/^ *\(Pre\)\{0,1\}Depends: python\(3\.[0-9]*\)-minimal.*/\2/p" | head -1)"
[[ -n "$pyver" ]] || { echo "build_image.sh: no python3.X-minimal in $suite" >&2; exit 1; }
pkgs=("$kpkg" "python$pyver-minimal" "libpython$pyver-minimal" "libpython$pyver-stdlib"
      libc6 libffi8 zlib1g libexpat1)
echo "arm64 image: downloading ${pkgs[*]}"
(cd "$cache/debs" && apt-get "${aptopts[@]}" download "${pkgs[@]}" >/dev/null)

root="$cache/root.tmp"
rm -rf "$root"
mkdir -p "$root"
for p in "${pkgs[@]}"; do
    deb="$(ls "$cache/debs/${p}_"*_arm64.deb 2>/dev/null | sort | tail -1)"
    [[ -n "$deb" ]] || { echo "build_image.sh: $p was not downloaded" >&2; exit 1; }
    dpkg-deb -x "$deb" "$root"
done

# The kernel image: Debian's vmlinuz is a gzip-compressed arm64 Image.
vmlinuz="$(ls "$root"/boot/vmlinuz-* | head -1)"
if gzip -t "$vmlinuz" 2>/dev/null; then
    gzip -dc "$vmlinuz" > "$cache/Image.tmp"
else
    cp "$vmlinuz" "$cache/Image.tmp"
fi
mv "$cache/Image.tmp" "$cache/Image"
kver="$(basename "$vmlinuz" | sed 's/^vmlinuz-//')"

# The initramfs: Python and its libraries, nothing of the kernel's modules
# (KVM, the PL011 console and the ARM timers are built in).
rm -rf "$root/boot" "$root/lib/modules" "$root/usr/lib/modules" "$root"/usr/lib/linux-image-* \
       "$root/usr/lib/aarch64-linux-gnu/gconv" "$root/usr/share"
stdlib="$root/usr/lib/python$pyver"
rm -rf "$stdlib/test" "$stdlib/idlelib" "$stdlib/tkinter" "$stdlib/turtledemo" \
       "$stdlib/ensurepip" "$stdlib/pydoc_data" "$stdlib/lib2to3"
find "$root" -name __pycache__ -type d -prune -exec rm -rf {} +
# merged /usr: /lib and /bin point into /usr
for d in bin lib sbin; do
    if [[ ! -e "$root/$d" ]]; then ln -s "usr/$d" "$root/$d"; fi
done
ln -sf "python$pyver" "$root/usr/bin/python3"
mkdir -p "$root/proc" "$root/sys" "$root/dev" "$root/tmp" "$root/mnt"
python3 "$here/mkcpio.py" "$cache/base.cpio.tmp" "$root" --console
mv "$cache/base.cpio.tmp" "$cache/base.cpio"
rm -rf "$root"
echo "$suite kernel $kver python $pyver" > "$stamp"
echo "arm64 image: built in $cache ($(cat "$stamp"))"

#!/bin/bash
# Build the l3ptp Debian package from this repository.
#
#   packaging/build-deb.sh [OUTDIR]        (default OUTDIR: dist/)
#
# Stages the source tree (files tracked or not ignored by git; the working
# tree as it is, not a commit) in a temporary directory, puts
# packaging/debian/ there as debian/, runs dpkg-buildpackage -b and copies
# the .deb, .buildinfo and .changes to OUTDIR. Runs lintian when installed
# (L3PTP_LINTIAN=0 skips it).
#
# Build dependencies (Debian bookworm): dpkg-dev debhelper python3.11
# python3.11-dev python3-pip python3-setuptools python3-wheel gcc; lintian
# optional. The bundled Python dependencies come from the package index pip
# is configured with (PIP_INDEX_URL / PIP_FIND_LINKS for a local wheelhouse).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
outdir="$(mkdir -p "${1:-$repo/dist}" && cd "${1:-$repo/dist}" && pwd)"
version="$(dpkg-parsechangelog -l "$here/debian/changelog" -S Version)"

work="$(mktemp -d "${TMPDIR:-/tmp}/l3ptp-deb.XXXXXX")"
trap 'rm -rf "$work"' EXIT
src="$work/l3ptp-$version"
mkdir -p "$src"

cd "$repo"
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    # Tracked files deleted in the working tree are skipped (the copy is the
    # working tree as it is).
    git ls-files -z --cached --others --exclude-standard \
        | grep -zv -e '^packaging/debian/' -e '^\.venv/' -e '^build/' -e '^dist/' \
        | xargs -0 -I{} sh -c 'if test -e "$1"; then printf "%s\0" "$1"; fi' sh {} \
        | xargs -0 cp --parents -t "$src"
else
    tar -C "$repo" --exclude=.venv --exclude=build --exclude=dist --exclude='*.egg-info' \
        --exclude=packaging/debian -cf - . | tar -C "$src" -xf -
fi
cp -a "$here/debian" "$src/debian"

cd "$src"
dpkg-buildpackage -b -us -uc --no-sign
cd "$work"
cp -v ./*.deb ./*.buildinfo ./*.changes "$outdir/"

if [ "${L3PTP_LINTIAN:-1}" != 0 ] && command -v lintian >/dev/null; then
    lintian --fail-on error,warning --info "$outdir"/l3ptp_"${version}"_*.changes
fi

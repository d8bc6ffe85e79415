#!/bin/bash
# Build dist/ddump_<version>_<arch>.deb from this repository (arch: amd64 here; the merge
# engine has a part in C).
# The build runs in a temporary copy with packaging/debian/ put at debian/, so the work tree gets
# nothing but the .deb. Missing build dependencies are installed with apt-get (needs root).
# Usage: packaging/build-deb.sh [OUTDIR]        (default OUTDIR: <repository>/dist)
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"   # also when started as `sh build-deb.sh`
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
outdir=${1:-$repo/dist}
started=$SECONDS

# Debian's python3 and tools, never a virtualenv's or pyenv's: the package runs on /usr/bin/python3.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
unset PYTHONPATH PYTHONHOME VIRTUAL_ENV PYENV_VERSION
export LC_ALL=C.UTF-8 DEBIAN_FRONTEND=noninteractive

say() { echo "build-deb: $*" >&2; }
die() { say "error: $*"; exit 1; }

apt_install() {
    [ "$(id -u)" = 0 ] || die "missing build tools; as root run: apt-get install $*"
    say "installing $*"
    apt-get install -y -q --no-install-recommends "$@" >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends "$@" >/dev/null; }
}

command -v dpkg-buildpackage >/dev/null || apt_install dpkg-dev
command -v python3 >/dev/null || apt_install python3

version=$(python3 -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' \
    "$repo/pyproject.toml")
deb_version=$(dpkg-parsechangelog -l "$repo/packaging/debian/changelog" -S Version)
[ "$version" = "$deb_version" ] \
    || die "pyproject.toml has version $version but packaging/debian/changelog has $deb_version: add a changelog entry"

work=$(mktemp -d "${TMPDIR:-/tmp}/ddump-deb.XXXXXX")
trap 'rm -rf "$work"' EXIT
src=$work/ddump-$version
mkdir "$src"

# Copy what git would commit (tracked and new files, minus .gitignore'd ones like .venv/ and dist/).
if git -C "$repo" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git -C "$repo" ls-files -z --cached --others --exclude-standard \
        | (cd "$repo" && while IFS= read -r -d '' f; do [ -f "$f" ] && printf '%s\0' "$f"; done) \
        | tar -C "$repo" --null -T - -cf - | tar -C "$src" -xf -
else
    tar -C "$repo" -cf - --exclude=.git --exclude=.venv --exclude=dist --exclude=build \
        --exclude='*.egg-info' --exclude=__pycache__ --exclude='.*_cache' . | tar -C "$src" -xf -
fi
mv "$src/packaging/debian" "$src/debian"

if ! (cd "$src" && dpkg-checkbuilddeps >/dev/null 2>&1); then
    [ "$(id -u)" = 0 ] || { (cd "$src" && dpkg-checkbuilddeps) || true; die "install the build dependencies above as root"; }
    say "installing build dependencies"
    apt-get build-dep -y -q --no-install-recommends "$src" >"$work/apt.log" 2>&1 \
        || { apt-get update -q >>"$work/apt.log" 2>&1 \
            && apt-get build-dep -y -q --no-install-recommends "$src" >>"$work/apt.log" 2>&1; } \
        || { cat "$work/apt.log" >&2; die "apt-get build-dep failed"; }
    (cd "$src" && dpkg-checkbuilddeps) || die "build dependencies still missing"
fi

say "building ddump $version"
if ! (cd "$src" && timeout 900 dpkg-buildpackage -b --no-sign) >"$work/build.log" 2>&1; then
    tail -n 80 "$work/build.log" >&2
    die "dpkg-buildpackage failed (last 80 lines above)"
fi

deb=ddump_${version}_$(dpkg --print-architecture).deb
[ -f "$work/$deb" ] || die "dpkg-buildpackage made no $deb"
mkdir -p "$outdir"
cp "$work/$deb" "$outdir/$deb"
say "$outdir/$deb ($(du -k "$outdir/$deb" | cut -f1) KiB) in $((SECONDS - started)) s"
echo "$outdir/$deb"

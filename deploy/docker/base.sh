#!/usr/bin/env bash
# Makes the two base images deploy/docker/Dockerfile builds FROM, from Debian's mirror alone
# (no container registry needed): mmdebstrap --variant=minbase bookworm, then docker import.
#
#   voiceedge/python-runtime:<key>  bookworm minbase, python3.11 (3.11.2, the interpreter the
#                                   runtime locks are resolved with), libopus0, user 10001
#   voiceedge/python-build:<key>    the same plus gcc, python3.11-dev and -venv, CA certificates
#
# <key> hashes their inputs (package lists, options, hooks, mirrors): an image whose key exists is reused,
# so only a changed input builds anew. Both are also tagged :bookworm, the Dockerfile's default.
# Prints the two image names (runtime, then build) on stdout.
#   deploy/docker/base.sh [--force]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
docker="${DOCKER:-docker}"
mirror="${VOICEEDGE_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
security="${VOICEEDGE_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"

runtime_packages=python3.11,libopus0
build_packages="$runtime_packages,python3.11-venv,python3.11-dev,gcc,libc6-dev,ca-certificates"

options=(
  --variant=minbase
  # Recommends off, and the merged-usr hook lays out /usr itself: the default installs the
  # usrmerge package, which brings perl (54 MB) into every image.
  --aptopt='APT::Install-Recommends "false"'
  --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr
  # Documentation, manuals and translations are never read in a container.
  --dpkgopt='path-exclude=/usr/share/doc/*'
  --dpkgopt='path-include=/usr/share/doc/*/copyright'
  --dpkgopt='path-exclude=/usr/share/man/*'
  --dpkgopt='path-exclude=/usr/share/info/*'
  --dpkgopt='path-exclude=/usr/share/locale/*'
  --dpkgopt='path-exclude=/usr/share/lintian/*'
)
# The unprivileged user every service runs as (minbase has no useradd).
user_hook='echo "voiceedge:x:10001:10001::/nonexistent:/usr/sbin/nologin" >>"$1/etc/passwd"; echo "voiceedge:x:10001:" >>"$1/etc/group"'
clean_hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/* "$1"/var/log/*'

# The key: every input of the images (packages, options, hooks, mirrors), nothing else.
key="$(printf '%s\n' "$runtime_packages" "$build_packages" "${options[@]}" "$user_hook" \
  "$clean_hook" "$(mmdebstrap --version)" "$mirror" "$security" | sha256sum | cut -c1-12)"
runtime="voiceedge/python-runtime:$key"
build="voiceedge/python-build:$key"

have() { "$docker" image inspect "$1" >/dev/null 2>&1; }

make_image() {
  local tag="$1" packages="$2"
  echo "base.sh: building $tag with mmdebstrap" >&2
  mmdebstrap --quiet --include="$packages" "${options[@]}" \
    --customize-hook="$user_hook" --customize-hook="$clean_hook" \
    bookworm - "deb $mirror bookworm main" "deb $mirror bookworm-updates main" \
    "deb $security bookworm-security main" |
    "$docker" import \
      --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --change 'ENV LANG=C.UTF-8' \
      --change 'CMD ["python3.11"]' \
      - "$tag" >/dev/null
}

# One maker at a time (two builds of one key would race to tag it).
exec 9>"${TMPDIR:-/tmp}/voiceedge-base.lock"
flock 9
if [ "${1:-}" = "--force" ] || ! have "$runtime"; then
  make_image "$runtime" "$runtime_packages"
fi
if [ "${1:-}" = "--force" ] || ! have "$build"; then
  make_image "$build" "$build_packages"
fi
"$docker" tag "$runtime" voiceedge/python-runtime:bookworm
"$docker" tag "$build" voiceedge/python-build:bookworm
echo "$runtime"
echo "$build"

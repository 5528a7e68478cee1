#!/usr/bin/env bash
# Builds every service image from the runtime locks, checks each, and tags them consistently:
#   <registry>/<service>:<tag>   (default voiceedge/<service>:<git short revision>, and :dev)
#
#   deploy/build-images.sh [--registry REG] [--tag TAG] [--index-url URL] [--ca FILE]...
#
# --index-url: a private package index (pip's --index-url); --ca: a PEM file to trust while
# fetching packages (a private index's or a TLS-inspecting proxy's CA; repeatable). Without
# --ca, the CAs this machine added to Debian's store (/usr/local/share/ca-certificates) are
# passed, so a build behind such a proxy works unchanged. The bases come from
# deploy/docker/base.sh (cached by their inputs). Each finished image is checked: pip check
# inside it, and its service's entry module imports. Needs a running Docker engine
# (DOCKER_HOST as usual) and network access to the package index.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
docker="${DOCKER:-docker}"
services=(geosteer signaling relay transceiver bridge)
registry=voiceedge
tag="$(git -C "$root" rev-parse --short=12 HEAD 2>/dev/null || echo dev)"
index_url=""
cas=()
while [ $# -gt 0 ]; do
  case "$1" in
    --registry) registry="$2"; shift 2 ;;
    --tag) tag="$2"; shift 2 ;;
    --index-url) index_url="$2"; shift 2 ;;
    --ca) cas+=("$2"); shift 2 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "build-images.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
if [ "${#cas[@]}" -eq 0 ]; then
  shopt -s nullglob
  cas=(/usr/local/share/ca-certificates/*.crt)
  shopt -u nullglob
fi
ca_pem=""
for ca in "${cas[@]}"; do
  ca_pem+="$(cat "$ca")"$'\n'
done

mapfile -t bases < <(DOCKER="$docker" "$root/deploy/docker/base.sh")
args=(
  --network host
  --file "$root/deploy/docker/Dockerfile"
  --build-arg "BASE_IMAGE=${bases[0]}"
  --build-arg "BUILD_IMAGE=${bases[1]}"
  --build-arg "VERSION=$tag"
  --build-arg "REVISION=$(git -C "$root" rev-parse HEAD 2>/dev/null || echo unknown)"
  --build-arg "CA_CERTS_PEM=$ca_pem"
)
[ -z "$index_url" ] || args+=(--build-arg "PIP_INDEX_URL=$index_url")

for service in "${services[@]}"; do
  image="$registry/$service:$tag"
  echo "build-images.sh: $image" >&2
  # The classic builder: Debian's engine has no BuildKit front end offline, and the layer
  # cache it keeps makes a rebuild with unchanged inputs take seconds.
  DOCKER_BUILDKIT=0 "$docker" build --quiet --force-rm "${args[@]}" --target "$service" \
    --tag "$image" --tag "$registry/$service:dev" "$root" >/dev/null
  "$docker" run --rm --network none --entrypoint python "$image" -m pip check >&2
  "$docker" run --rm --network none --entrypoint python "$image" \
    -c "import services.$service.__main__" >&2
  if [ "$service" = bridge ]; then  # the listen backend's speech: espeak-ng, the model
    "$docker" run --rm --network none --entrypoint espeak-ng "$image" --version >&2
    "$docker" run --rm --network none --entrypoint python "$image" \
      -c "import libs.speech.recognition as r; r.load_model()" >&2
  fi
  size="$("$docker" image inspect --format '{{.Size}}' "$image")"
  echo "$image $((size / 1000000)) MB"
done

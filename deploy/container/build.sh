#!/usr/bin/env bash
# Build the serving image with podman where Docker Hub cannot be reached: the base image is made
# from Debian's archive by mmdebstrap (once, then kept), the rest comes from this machine's pip
# indexes and cache, mounted into the build.
#
#   deploy/container/build.sh                           # localhost/cifar10-serve:server, no model
#   deploy/container/build.sh --model build/model       # localhost/cifar10-serve:latest, model baked in
#   deploy/container/build.sh --model-uri models:/cifar10-resnet@champion --tag cifar10-serve:v1
#
# TORCH_INDEX_URL picks the PyTorch build (default: PyPI, whose Linux wheels are the CUDA ones;
# https://download.pytorch.org/whl/cpu gives the CPU-only build where it can be reached);
# TORCH_VERSION and TORCHVISION_VERSION override the Containerfile's pins.
set -euo pipefail
cd "$(dirname "$0")/../.."

usage="usage: deploy/container/build.sh [--model DIR | --model-uri URI] [--tag NAME:TAG]"
model_dir="" model_uri="" tag=""
while [ $# -gt 0 ]; do
  case "$1" in
    --model) model_dir="${2:?$usage}"; shift 2 ;;
    --model-uri) model_uri="${2:?$usage}"; shift 2 ;;
    --tag) tag="${2:?$usage}"; shift 2 ;;
    *) echo "$usage" >&2; exit 2 ;;
  esac
done
command -v podman >/dev/null || {
  echo "podman is not installed: apt-get install podman runc mmdebstrap (or use docker build, docs/deploy.md)" >&2
  exit 1
}
export CONTAINERS_CONF="${CONTAINERS_CONF:-$PWD/deploy/container/containers.conf}"
base="${BASE_IMAGE:-localhost/cifar10-base:bookworm}"

context="$(mktemp -d)"
trap 'rm -rf "$context"' EXIT

if ! podman image exists "$base"; then
  echo "build: making the base image $base from Debian's archive (mmdebstrap, about 2 min)"
  mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates \
    --aptopt='Acquire::Languages "none"' \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    bookworm "$context/base.tar"
  podman import --quiet --change 'CMD ["/bin/bash"]' "$context/base.tar" "$base" >/dev/null
  rm "$context/base.tar"
fi

if [ -n "$model_uri" ]; then
  echo "build: downloading $model_uri"
  mlflow artifacts download -u "$model_uri" -d "$context/build/model" >/dev/null
elif [ -n "$model_dir" ]; then
  [ -f "$model_dir/MLmodel" ] || {
    echo "--model $model_dir holds no MLmodel file; download one first: mlflow artifacts download -u models:/cifar10-resnet@champion -d build/model" >&2
    exit 2
  }
  mkdir -p "$context/build" && cp -r "$model_dir" "$context/build/model"
fi
if [ -d "$context/build/model" ]; then target=model; tag="${tag:-localhost/cifar10-serve:latest}"
else target=server; tag="${tag:-localhost/cifar10-serve:server}"; fi
cp -r pyproject.toml README.md .dockerignore pipeline registry "$context/"

# This machine's pip settings travel into the build: its file:// indexes (mounted read-only at the
# same paths), its CA bundle and its cache (so the image's pip downloads nothing the host has).
build_args=(--build-arg "BASE_IMAGE=$base" --build-arg "TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://pypi.org/simple}")
for pin in TORCH_VERSION TORCHVISION_VERSION; do
  [ -n "${!pin:-}" ] && build_args+=(--build-arg "$pin=${!pin}")
done
find_links="${PIP_FIND_LINKS:-$(pip config get global.find-links 2>/dev/null || true)}"
if [ -n "$find_links" ]; then
  build_args+=(--build-arg "PIP_FIND_LINKS=$find_links")
  for links in $find_links; do [ -d "$links" ] && build_args+=(-v "$links:$links:ro"); done
fi
extra_index="${PIP_EXTRA_INDEX_URL:-$(pip config get global.extra-index-url 2>/dev/null || true)}"
if [ -n "$extra_index" ]; then
  build_args+=(--build-arg "PIP_EXTRA_INDEX_URL=$extra_index")
  for index in $extra_index; do
    case "$index" in file://*)
      root="$(dirname "${index#file://}")"; build_args+=(-v "$root:$root:ro") ;;
    esac
  done
fi
cert="${PIP_CERT:-$(pip config get global.cert 2>/dev/null || true)}"
if [ -n "$cert" ] && [ -f "$cert" ]; then
  build_args+=(-v "$cert:/etc/pip-host-ca.crt:ro" --build-arg PIP_CERT=/etc/pip-host-ca.crt)
fi
cache="$(pip cache dir 2>/dev/null || true)"
[ -n "$cache" ] && mkdir -p "$cache" && build_args+=(-v "$cache:/pip-cache")

echo "build: $tag (target $target, base $base)"
podman build --format docker --target "$target" -f deploy/Containerfile "${build_args[@]}" \
  -t "$tag" "$context"
echo "build: $tag is $(podman image inspect --format '{{.Size}}' "$tag" | awk '{printf "%.2f GB", $1 / 1e9}')"

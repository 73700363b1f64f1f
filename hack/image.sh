#!/usr/bin/env bash
# Builds the operator's image from the shipped Dockerfile with buildah: no Docker engine and
# no image registry needed.
#
#   hack/image.sh build [--release] [--bin-dir DIR]
#       Compiles the binaries (dev profile unless --release; with --bin-dir DIR, packages the
#       binaries already in DIR, a directory inside the checkout, and runs no cargo), makes
#       sure the base image exists, builds the image and writes it as an OCI archive.
#       Prints the archive's path on stdout; logs go to stderr.
#         image:   localhost/webhook-operator:dev        (:release with --release)
#         archive: $cache/images/webhook-operator-dev.oci.tar
#       Load it into containerd with `ctr -n k8s.io images import ARCHIVE`.
#   hack/image.sh base          make sure the base image exists (built once, cached)
#   hack/image.sh buildah ARGS  run buildah ARGS with this script's storage
#
# $cache is ${XDG_CACHE_HOME:-$HOME/.cache}/webhook-operator (WEBHOOK_OPERATOR_CACHE overrides).
#
# The base: no registry is reachable here, so `debian:bookworm-slim` is a stand-in made on
# the machine from Debian's packages (`debootstrap --variant=minbase`, trimmed as the slim
# image is), built once per BASE_REVISION and kept as a root filesystem tarball in the cache.
# Where the real image is present in the storage, it is used as it is.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# debootstrap lives in /usr/sbin, which a non-login PATH may lack.
export PATH="$PATH:/usr/sbin:/sbin"

BASE_IMAGE=docker.io/library/debian:bookworm-slim
BASE_SUITE=bookworm
# Bump to make the stand-in anew (a change to how it is made below).
BASE_REVISION=1
BASE_LABEL=io.webhook-operator.stand-in
IMAGE_REPO=localhost/webhook-operator
# Build steps are bounded: a hung mirror or builder fails the build instead of waiting.
STEP_TIMEOUT=${WEBHOOK_OPERATOR_IMAGE_TIMEOUT:-900}

cache=${WEBHOOK_OPERATOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/webhook-operator}
images="$cache/images"
# A storage of its own (vfs: works as root without overlay support), so the builds of this
# project neither see nor disturb any other buildah/podman storage on the machine.
storage=(--storage-driver vfs --root "$images/storage" --runroot "$images/runroot")

log() { echo "image.sh: $*" >&2; }
bh() { timeout "$STEP_TIMEOUT" buildah "${storage[@]}" "$@"; }

need_tools() {
  local t
  for t in buildah debootstrap; do
    command -v "$t" >/dev/null || { log "$t is required (hack/setup.sh installs it)"; exit 1; }
  done
}

# The Debian mirror apt is configured with here, for debootstrap (its own default otherwise).
debian_mirror() {
  apt-get indextargets --format '$(REPO_URI)' 'Identifier: Packages' "Codename: $BASE_SUITE" \
    'Origin: Debian' 2>/dev/null | head -n1
}

# The stand-in's root filesystem as a tarball, made once per revision.
base_tarball() {
  local tarball="$images/base/debian-$BASE_SUITE-slim-r$BASE_REVISION.tar"
  if [[ ! -s "$tarball" ]]; then
    mkdir -p "$images/base"
    local tmp
    tmp=$(mktemp -d "$images/base/rootfs.XXXXXX")
    log "making the $BASE_IMAGE stand-in with debootstrap (once)"
    # shellcheck disable=SC2046 # an empty mirror means debootstrap's default
    if ! timeout "$STEP_TIMEOUT" debootstrap --variant=minbase "$BASE_SUITE" "$tmp/rootfs" \
      $(debian_mirror) >"$tmp/debootstrap.log" 2>&1; then
      tail -n 20 "$tmp/debootstrap.log" >&2
      log "debootstrap failed (its log: $tmp/debootstrap.log)"
      exit 1
    fi
    # Trimmed as the slim image is: no documentation, manuals or translations, now or
    # for packages installed later; no package lists or downloaded packages.
    mkdir -p "$tmp/rootfs/etc/dpkg/dpkg.cfg.d"
    printf '%s\n' 'path-exclude /usr/share/doc/*' 'path-include /usr/share/doc/*/copyright' \
      'path-exclude /usr/share/man/*' 'path-exclude /usr/share/groff/*' \
      'path-exclude /usr/share/info/*' 'path-exclude /usr/share/lintian/*' \
      'path-exclude /usr/share/locale/*' >"$tmp/rootfs/etc/dpkg/dpkg.cfg.d/docker"
    find "$tmp/rootfs/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
    rm -rf "$tmp/rootfs"/usr/share/{man,groff,info,lintian,locale}/* \
      "$tmp/rootfs"/var/lib/apt/lists/* "$tmp/rootfs"/var/cache/apt/*.bin \
      "$tmp/rootfs"/var/cache/apt/archives/*.deb "$tmp/rootfs"/var/log/*.log
    tar -C "$tmp/rootfs" --numeric-owner -cf "$tmp/rootfs.tar" .
    mv "$tmp/rootfs.tar" "$tarball"
    rm -rf "$tmp"
  fi
  echo "$tarball"
}

ensure_base() {
  local have
  have=$(bh inspect --type image --format "{{index .OCIv1.Config.Labels \"$BASE_LABEL\"}}" \
    "$BASE_IMAGE" 2>/dev/null || true)
  if [[ "$have" == "r$BASE_REVISION" ]]; then return; fi
  if [[ -z "$have" ]] && bh inspect --type image "$BASE_IMAGE" >/dev/null 2>&1; then
    return # the real image, not a stand-in
  fi
  local tarball ctr mnt
  tarball=$(base_tarball)
  log "importing the stand-in as $BASE_IMAGE"
  ctr=$(bh from --pull=never scratch)
  mnt=$(bh mount "$ctr")
  tar -C "$mnt" --numeric-owner -xf "$tarball"
  bh umount "$ctr" >/dev/null
  bh config --os linux --arch "$(dpkg --print-architecture)" --cmd bash \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --label "$BASE_LABEL=r$BASE_REVISION" "$ctr"
  bh commit --quiet --rm "$ctr" "$BASE_IMAGE" >/dev/null
}

build() {
  local profile=dev bin_dir=""
  while (($#)); do
    case "$1" in
      --release) profile=release ;;
      --bin-dir) bin_dir=${2:?--bin-dir needs a directory}; shift ;;
      *) log "unknown flag $1"; exit 2 ;;
    esac
    shift
  done
  if [[ -z "$bin_dir" ]]; then
    local target_dir=${CARGO_TARGET_DIR:-$root/target}
    local flags=(--locked --workspace --bins)
    [[ $profile == release ]] && flags+=(--release)
    log "cargo build ${flags[*]}"
    (cd "$root" && cargo build "${flags[@]}") >&2
    bin_dir="$target_dir/$([[ $profile == release ]] && echo release || echo debug)"
  fi
  # The Dockerfile copies from the build context (the checkout): the directory is named
  # relative to it.
  bin_dir=$(cd "$root" && realpath -m "$bin_dir")
  case "$bin_dir" in
    "$root"/*) bin_dir=${bin_dir#"$root"/} ;;
    *) log "the binaries must be inside the checkout (the build context): $bin_dir"; exit 2 ;;
  esac

  local image="$IMAGE_REPO:$profile" archive="$images/webhook-operator-$profile.oci.tar"
  ensure_base
  log "buildah bud -t $image (binaries from $bin_dir)"
  # chroot isolation: runs as root here without user namespaces or a runtime's cgroups.
  # --layers: unchanged steps are reused from the last build. The CA stage ("certs") is
  # built and tagged first, so that pruning the earlier builds below keeps its apt-get.
  local bud=(bud --pull=never --isolation chroot --layers --quiet -f "$root/Dockerfile"
    --build-arg "BIN_DIR=$bin_dir")
  if grep -qiE '^FROM .* AS certs$' "$root/Dockerfile"; then
    bh "${bud[@]}" --target certs -t "$IMAGE_REPO-certs:cache" "$root" >/dev/null
  fi
  bh "${bud[@]}" -t "$image" "$root" >/dev/null
  # Drop the earlier builds no tag names any more (vfs keeps a full copy per layer).
  local i
  for i in 1 2 3 4 5 6 7 8 9 10; do
    [[ -n "$(bh rmi --prune 2>/dev/null)" ]] || break
  done
  # The archive is written anew only when the image changed (compressing it is most of a
  # warm build's time); $archive.id names the image it holds.
  local id
  id=$(bh inspect --type image --format '{{.FromImageID}}' "$image")
  if [[ ! -s "$archive" || "$(cat "$archive.id" 2>/dev/null)" != "$id" ]]; then
    local tmp="$archive.tmp.$$"
    rm -f "$tmp"
    bh push --quiet "$image" "oci-archive:$tmp:$image" >&2
    mv "$tmp" "$archive"
    echo "$id" >"$archive.id"
  fi
  echo "$archive"
}

# One build at a time per cache: the base and the archive are shared.
lock() {
  need_tools
  mkdir -p "$images"
  exec 9>"$images/.lock"
  flock -w "$STEP_TIMEOUT" 9 || { log "another build holds $images/.lock"; exit 1; }
}
case "${1:-}" in
  build) shift; lock; build "$@" ;;
  base) lock; ensure_base; echo "$BASE_IMAGE" ;;
  buildah) shift; exec buildah "${storage[@]}" "$@" ;;
  *) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac

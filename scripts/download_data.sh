#!/usr/bin/env bash
# Download MVTec AD and DTD (the anomaly-source textures) into ./datasets, the layout train_draem.py expects:
#   datasets/mvtec/<category>/{train,test,ground_truth}   datasets/dtd/images/<class>/*.jpg
# MVTec AD is licensed CC BY-NC-SA 4.0 (non-commercial); DTD is for research use.
# The addresses are the archives' official locations. The MVTec page may ask you to accept its licence in a
# browser first: then download the archive by hand and pass its path as the first argument.
# Each dataset is tried even when the other fails; the exit status is 1 when either failed.
set -uo pipefail
MVTEC_URL="https://www.mydrive.ch/shares/38536/3830184030e49fe74747669442f0f282/download/420938113-1629952094/mvtec_anomaly_detection.tar.xz"
DTD_URL="https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz"
failed=()

mvtec() {
  [ -d datasets/mvtec/bottle ] && return 0
  local archive="${1:-datasets/mvtec_anomaly_detection.tar.xz}"
  mkdir -p datasets/mvtec
  { [ -f "$archive" ] || curl -L --fail -o "$archive" "$MVTEC_URL"; } && tar -xf "$archive" -C datasets/mvtec
}

dtd() {
  [ -d datasets/dtd/images ] && return 0
  mkdir -p datasets
  curl -L --fail -o datasets/dtd.tar.gz "$DTD_URL" && tar -xzf datasets/dtd.tar.gz -C datasets
}

mvtec "${1:-}" || failed+=("MVTec AD (download it by hand from https://www.mvtec.com/company/research/datasets/mvtec-ad and pass the archive)")
dtd || failed+=("DTD ($DTD_URL)")
if [ ${#failed[@]} -gt 0 ]; then
  printf 'failed: %s\n' "${failed[@]}" >&2
  exit 1
fi
echo "MVTec AD in datasets/mvtec, DTD in datasets/dtd/images"

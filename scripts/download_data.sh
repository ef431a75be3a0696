#!/usr/bin/env bash
# Download MVTec AD and DTD (the anomaly-source textures) into ./datasets, the layout train_draem.py expects:
#   datasets/mvtec/<category>/{train,test,ground_truth}   datasets/dtd/images/<class>/*.jpg
# MVTec AD is licensed CC BY-NC-SA 4.0 (non-commercial); DTD is for research use.
# The addresses are the archives' official locations (the MVTec page may ask you to accept its licence
# in a browser first: then download by hand and pass the archive path as the first argument).
set -euo pipefail
MVTEC_URL="https://www.mydrive.ch/shares/38536/3830184030e49fe74747669442f0f282/download/420938113-1629952094/mvtec_anomaly_detection.tar.xz"
DTD_URL="https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz"
mkdir -p datasets/mvtec
if [ ! -d datasets/mvtec/bottle ]; then
  archive="${1:-datasets/mvtec_anomaly_detection.tar.xz}"
  [ -f "$archive" ] || curl -L --fail -o "$archive" "$MVTEC_URL"
  tar -xf "$archive" -C datasets/mvtec
fi
if [ ! -d datasets/dtd/images ]; then
  curl -L --fail -o datasets/dtd.tar.gz "$DTD_URL"
  tar -xzf datasets/dtd.tar.gz -C datasets
fi
echo "MVTec AD in datasets/mvtec, DTD in datasets/dtd/images"

#!/bin/sh
# Use trained weights when there are some and none were named: a checkpoint mounted at
# /models/ensemble.pt first, else one baked into the image at build time.
set -e
if [ -z "${REID_WEIGHTS_PATH:-}" ]; then
    for candidate in /models/ensemble.pt /opt/reid/weights/ensemble.pt; do
        if [ -f "$candidate" ]; then
            export REID_WEIGHTS_PATH="$candidate"
            break
        fi
    done
fi
exec reid-stream "$@"

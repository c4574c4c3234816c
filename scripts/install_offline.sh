#!/usr/bin/env bash
# Install fairseq and this plugin from a wheelhouse (scripts/build_wheelhouse.sh) into a node's existing
# Python, offline, next to its torch: torch (and torchvision, if installed) are pinned to the versions the
# node has, so pip can neither replace nor upgrade them; anything missing from the wheelhouse is an error,
# never a download.
#
#   bash scripts/install_offline.sh .whl                    # python3 on PATH
#   PYTHON=/opt/venv/bin/python3 bash scripts/install_offline.sh /path/to/wheelhouse
#   bash scripts/install_offline.sh .whl --dry-run          # probe and print the pip commands only
#
# It first prints a probe of the node (Python, torch, CUDA, GPUs, compiler, CPU cores), then checks that
# the wheelhouse was built for this Python, installs, and ends with `import fairseq, fairseq_mmkd`.
# Extra pip arguments: PIP_INSTALL_ARGS (e.g. "--user" or "--break-system-packages").
set -euo pipefail

usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; }
WHEELHOUSE=""
DRY_RUN=0
PLUGIN=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    --no-plugin) PLUGIN=0; shift ;;  # use the plugin from a checkout (common.user_dir) only
    -h|--help) usage; exit 0 ;;
    -*) echo "[install] unknown option $1 (see --help)" >&2; exit 2 ;;
    *) [[ -z "$WHEELHOUSE" ]] || { echo "[install] one wheelhouse only" >&2; exit 2; }; WHEELHOUSE=$1; shift ;;
  esac
done
die() { echo "[install] error: $*" >&2; exit 2; }
[[ -n "$WHEELHOUSE" ]] || die "usage: install_offline.sh WHEELHOUSE [--dry-run] [--no-plugin] (build it with scripts/build_wheelhouse.sh)"
[[ -d "$WHEELHOUSE" ]] || die "wheelhouse $WHEELHOUSE is not a folder; build it with scripts/build_wheelhouse.sh and copy it here"
WHEELHOUSE=$(cd "$WHEELHOUSE" && pwd)
[[ -f "$WHEELHOUSE/wheelhouse.json" && -f "$WHEELHOUSE/requirements.txt" ]] || \
  die "$WHEELHOUSE has no wheelhouse.json/requirements.txt: not a folder written by scripts/build_wheelhouse.sh"
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null || die "$PY not found; set PYTHON=/path/to/the/python/that/has/torch"

# ---- probe: what this node has -------------------------------------------------------------------
probe=$("$PY" - "$WHEELHOUSE" <<'PY'
import importlib.util, json, os, platform, shutil, subprocess, sys
wh = json.load(open(os.path.join(sys.argv[1], "wheelhouse.json")))
info = {"python": "%d.%d.%d" % sys.version_info[:3], "executable": sys.executable,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "compiler": shutil.which("gcc") or shutil.which("cc") or "none", "nvcc": shutil.which("nvcc") or "none"}
try:
    import torch
    info.update(torch=torch.__version__, torch_cuda=torch.version.cuda or "none",
                gpus=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
except Exception as e:  # reported below as a clear error
    info["torch"] = None
    info["torch_error"] = f"{type(e).__name__}: {e}"
if importlib.util.find_spec("torchvision") is not None:
    from importlib.metadata import version
    info["torchvision"] = version("torchvision")
for line in ("python %(python)s (%(executable)s); %(cores)s CPU cores; compiler %(compiler)s; nvcc %(nvcc)s" % info,
             "torch %s, CUDA %s, GPUs %s" % (info.get("torch"), info.get("torch_cuda"), info.get("gpus")),
             "torchvision %s" % info.get("torchvision", "not installed"),
             "wheelhouse for Python %s, torch %s, built %s, %d wheels" % (wh["python"], wh["torch"], wh["built"], len(wh["wheels"]))):
    print("[install] " + line, file=sys.stderr)
errors = []
if info["torch"] is None:
    errors.append(f"torch does not import in {sys.executable} ({info['torch_error']}); install torch first (the "
                  "wheelhouse never carries it)")
if "%d.%d" % sys.version_info[:2] != wh["python"]:
    errors.append(f"the wheelhouse is for Python {wh['python']} but {sys.executable} is {info['python']}; rebuild it "
                  f"with scripts/build_wheelhouse.sh --python {'%d.%d' % sys.version_info[:2]}")
if info["torch"] and info["torch"].split("+")[0] != wh["torch"]:
    print(f"[install] warning: the wheelhouse was built against torch {wh['torch']} but this node has {info['torch']}: "
          "fairseq's torch C++ extensions (libbase, libnat; not used by this plugin) may not load. Rebuild with "
          f"--torch {info['torch'].split('+')[0]} to match", file=sys.stderr)
if "torchvision" not in info and not any(w.startswith("torchvision-") for w in wh["wheels"]):
    errors.append("torchvision is neither installed nor in the wheelhouse (it was left out by --node-freeze/--skip); "
                  "rebuild without leaving it out")
for e in errors:
    print("[install] error: " + e, file=sys.stderr)
from importlib.metadata import version  # the installed distributions' versions (torch.__version__ may add +cu130)
pins = [f"torch=={version('torch')}"] if info["torch"] else []
pins += [f"torchvision=={info['torchvision']}"] if "torchvision" in info else []
print(json.dumps({"ok": not errors, "pins": pins}))
PY
)
ok=$("$PY" -c 'import json,sys; print(int(json.loads(sys.argv[1])["ok"]))' "$probe")
[[ "$ok" == 1 ]] || exit 2

# ---- install -----------------------------------------------------------------------------------------
constraints=$(mktemp /tmp/mmkd_offline_constraints.XXXXXX)
trap 'rm -f "$constraints"' EXIT
"$PY" -c 'import json,sys; print("\n".join(json.loads(sys.argv[1])["pins"]))' "$probe" > "$constraints"
shopt -s nullglob
ours=("$WHEELHOUSE"/fairseq_fixed-*.whl)
[[ ${#ours[@]} -eq 1 ]] || die "expected one fairseq_fixed wheel in $WHEELHOUSE, found ${#ours[@]}"
[[ $PLUGIN == 0 ]] || ours+=("$WHEELHOUSE"/fairseq_mmkd-*.whl)
read -r -a extra <<<"${PIP_INSTALL_ARGS:-}"
common=(--no-index --find-links "$WHEELHOUSE" --disable-pip-version-check -c "$constraints" "${extra[@]}")
# 1. the dependencies, resolved against what is installed (kept) and the wheelhouse (added)
cmd1=("$PY" -m pip install "${common[@]}" -r "$WHEELHOUSE/requirements.txt")
# 2. fairseq-fixed and the plugin without their declared dependencies: fairseq-fixed lists torchaudio and
#    cython, which it does not import, and the plugin lists faiss-gpu, which is optional (torch search)
cmd2=("$PY" -m pip install "${common[@]}" --no-deps --force-reinstall "${ours[@]}")
if [[ $DRY_RUN == 1 ]]; then
  echo "[install] constraints: $(tr '\n' ' ' < "$constraints")"
  printf '[install] would run:'; printf ' %q' "${cmd1[@]}"; echo
  printf '[install] would run:'; printf ' %q' "${cmd2[@]}"; echo
  exit 0
fi
start=$(date +%s)
"${cmd1[@]}"
"${cmd2[@]}"

# ---- check ------------------------------------------------------------------------------------------
check_dir=$(mktemp -d /tmp/mmkd_offline_check.XXXXXX)  # not the repo root: test the installed copies
trap 'rm -f "$constraints"; rm -rf "$check_dir"' EXIT
plugin_check="import fairseq_mmkd, fairseq_mmkd.tasks.d2v_kd; print('[install] fairseq_mmkd', fairseq_mmkd.__file__)"
[[ $PLUGIN == 1 ]] || plugin_check="print('[install] plugin not installed (--no-plugin): use it from a checkout')"
(cd "$check_dir" && "$PY" -c "
import torch, fairseq, torchvision
from fairseq.data import data_utils_fast  # fairseq's compiled batching helper
print('[install] fairseq', fairseq.__version__, '| torch', torch.__version__, '| torchvision', torchvision.__version__)
$plugin_check
")
echo "[install] done in $(( $(date +%s) - start ))s; torch untouched ($(tr '\n' ' ' < "$constraints"))"

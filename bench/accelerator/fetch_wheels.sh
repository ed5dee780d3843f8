#!/usr/bin/env bash
# Downloads, here, the wheels the lent GPU machine lacks (bench/accelerator/wheels.txt) for
# its Python 3.12 on manylinux x86-64 into .whl/ at the repository root (git-ignored), and
# checks that they and the working tree (what travels: tracked and untracked-not-ignored
# files) fit the device tool's 64 MiB budget.
#
#     bench/accelerator/fetch_wheels.sh [--budget-mib=64]
#
# Then `run` on the device with carry [".whl"] and `bench/accelerator/run.sh`.
set -euo pipefail
cd "$(dirname "$0")/../.."
budget_mib=64  # the device tool's limit on the tree and the carried paths together
for arg in "$@"; do
  case "$arg" in
    --budget-mib=*) budget_mib="${arg#*=}" ;;
    *) echo "fetch_wheels.sh: unknown argument $arg (usage: fetch_wheels.sh [--budget-mib=64])" >&2; exit 2 ;;
  esac
done
python=${PYTHON:-python3}
mapfile -t pins < <(grep -v -E '^\s*(#|$)' bench/accelerator/wheels.txt)
mkdir -p .whl
platforms=()
# pip matches manylinux_2_N exactly: name every N a wheel of these packages is tagged with.
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
  manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$tag")
done
"$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" -d .whl "${pins[@]}"
# Exactly one wheel per pin: a second version of a package stops the whole install there.
for pin in "${pins[@]}"; do
  name=$(echo "${pin%%==*}" | tr 'A-Z-' 'a-z_')
  version=${pin#*==}
  n=$(find .whl -maxdepth 1 -type f -iname "${name}-*.whl" | wc -l)
  if [ "$n" -ne 1 ] || ! ls .whl | grep -qi "^${name}-${version}-"; then
    echo "fetch_wheels.sh: .whl holds $n wheels of ${pin%%==*} (want exactly ${pin}): remove the others" >&2
    exit 1
  fi
done
extra=$(( $(find .whl -maxdepth 1 -type f -name '*.whl' | wc -l) - ${#pins[@]} ))
if [ "$extra" -ne 0 ]; then
  echo "fetch_wheels.sh: .whl holds $extra wheels not in wheels.txt: remove them" >&2
  exit 1
fi
whl_kib=$(du -sk .whl | cut -f1)
tree_kib=$(git ls-files -z --cached --others --exclude-standard | du -ck --files0-from=- 2>/dev/null | tail -1 | cut -f1)
total_kib=$((whl_kib + tree_kib))
echo "${#pins[@]} wheels: $((whl_kib / 1024)) MiB in .whl/; with the tree ($((tree_kib / 1024)) MiB)" \
  "$((total_kib / 1024)) MiB of the ${budget_mib} MiB budget"
if [ "$total_kib" -gt $((budget_mib * 1024)) ]; then
  echo "fetch_wheels.sh: .whl/ and the tree are $((total_kib / 1024)) MiB, over the ${budget_mib} MiB budget" >&2
  exit 1
fi

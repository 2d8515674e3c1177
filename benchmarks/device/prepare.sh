#!/usr/bin/env bash
# Run here, in the repository root, before a device run: puts into .whl/ (ignored by git) the cp312 wheels the
# device machine lacks (OpenVINO without what a CPU run never loads, openvino-genai, openvino-tokenizers, NNCF),
# so that they travel with the working tree within the device tool's 64 MiB. Then see kernel_table.sh.
set -euo pipefail
version=$(python3 -c "import openvino; print(openvino.get_version().split('-')[0])")
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir "$work/whl"  # moved to .whl/ only once complete
nncf=$(python3 -c "import nncf; print(nncf.__version__)")
# openvino-genai and openvino-tokenizers too, as the package imports them (backends.openvino.genai), and NNCF for
# the compressed layers of kernel_bench (the device image holds NNCF's own dependencies)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d "$work" "openvino==$version" \
  "openvino-genai==$version.0" "openvino-tokenizers==$version.0" "nncf==$nncf"
mv "$work"/openvino_genai-*.whl "$work"/openvino_tokenizers-*.whl "$work"/nncf-*.whl "$work/whl/"
wheel=$(ls "$work"/openvino-*.whl)
python3 - "$wheel" <<'PY'
# Drops what a CPU run of IR models never loads: the GPU and NPU plugins, the GPU kernel cache, the framework
# frontends' Python bindings (their libraries stay: OpenVINO's CMake config checks that each exists). RECORD
# then lists only what the wheel holds, or pip refuses it.
import re, sys, zipfile
path = sys.argv[1]
fw = "tensorflow|tensorflow_lite|pytorch|paddle|jax|gguf"
drop = re.compile(rf"openvino/(libs/libopenvino_intel_(gpu|npu)_plugin\.so|libs/cache\.json|frontend/({fw})/.*)$")
with zipfile.ZipFile(path) as z:
    keep = [n for n in z.namelist() if not drop.match(n)]
    record = next(n for n in keep if n.endswith(".dist-info/RECORD"))
    lines = [l for l in z.read(record).decode().splitlines() if l.split(",")[0] in keep]
    items = [(n, z.read(n)) for n in keep if n != record]
with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
    for n, data in items:
        z.writestr(n, data)
    z.writestr(record, "\n".join(lines) + "\n")
PY
mv "$wheel" "$work/whl/"
rm -rf .whl && mv "$work/whl" .whl
du -sh .whl

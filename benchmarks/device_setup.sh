# Bootstrap a bare lent GPU machine for exllamav3 1.6.5 + TabbyAPI; source it from the repository root:
#     . benchmarks/device_setup.sh || exit 1
# Needs these ignored folders of the checkout carried to the device (see benchmarks/memory_calibration/README.md):
#   .whl/    wheels missing from the device image (exllamav3 1.6.5 and TabbyAPI's server dependencies)
#   .dev/exllamav3_ext-1.6.5-py312-cu130-sm90.so.gz   exllamav3's extension prebuilt for that image (skips a
#            272 s JIT build; ../shared/device/README.md)
#   .tabby/  TabbyAPI source (git archive of theroyallab/tabbyAPI); its path is exported as TABBY_DIR
# Leaves PYTHONPATH=/tmp/site:... and NVLink multicast off (the device README's rule) in the calling shell.

_setup_fail() { echo "device_setup: $*" >&2; return 1; }

[ -d .whl ] || { _setup_fail "no .whl/ folder: carry it"; return 1; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { _setup_fail "wheel install failed"; return 1; }
_ext=$(ls .dev/exllamav3_ext-*.so.gz 2>/dev/null | head -n 1)
if [ -n "$_ext" ]; then
    gunzip -c "$_ext" > /tmp/site/exllamav3_ext.so || { _setup_fail "cannot unpack $_ext"; return 1; }
else
    echo "device_setup: no prebuilt extension in .dev/: the first exllamav3 import compiles it (~5 min)" >&2
    export TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16
fi
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 CUDA_DEVICE_ORDER=PCI_BUS_ID
if [ -f .tabby/main.py ]; then
    TABBY_DIR=$(pwd)/.tabby
    export TABBY_DIR
else
    echo "device_setup: no .tabby/main.py: TabbyAPI is not available" >&2
fi
python3 - <<'PY' || { _setup_fail "exllamav3 does not import"; return 1; }
import torch, exllamav3
from exllamav3.version import __version__ as exl3_version
print(f"device_setup: torch {torch.__version__}, exllamav3 {exl3_version}, "
      f"{torch.cuda.device_count()} GPU(s): {[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}")
PY

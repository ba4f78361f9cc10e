# Bootstrap for the GPU runs of benchmarks/gpu_stack, serving_path, serving_speed and the held-out memory loads;
# source it from the repository root:  . benchmarks/gpu_stack/setup.sh || exit 1
# Idempotent (a second source in the same shell does nothing). On top of ../device_setup.sh (wheels into
# /tmp/site, the prebuilt exllamav3 extension, TabbyAPI in .tabby -> TABBY_DIR) it puts the project's code from
# the frozen snapshot .dev/snap (git archive of the commit named in .dev/snap/COMMIT) first on PYTHONPATH; always
# run it with `python3 -P` so the checkout's own toolkit/ (possibly mid-refactor) is never imported.
# Carry: .whl .tabby .dev (snapshot, renderings, the .so.gz).
if [ -z "${GLM_GPU_SETUP_DONE:-}" ]; then
    [ -d .dev/snap/toolkit ] || { echo "setup: no .dev/snap/toolkit: carry .dev" >&2; return 1; }
    . benchmarks/device_setup.sh || return 1
    export PYTHONPATH=$(pwd)/.dev/snap:$PYTHONPATH
    export NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost
    export GLM_GPU_SETUP_DONE=1
fi

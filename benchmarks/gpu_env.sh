# Source on a bare GPU machine without a package registry (torch, triton and transformers installed, nothing
# else): installs the wheels carried in .whl/ (tyro, math-verify, liger-kernel and their needs) into a private
# folder and makes fastprime importable from this checkout without pip.   source benchmarks/gpu_env.sh
site=/tmp/fastprime_site
mkdir -p "$site/fastprime"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        .whl/*.whl || return 1
fi
ln -sfn "$PWD/kernels" "$site/fastprime/kernels"
ln -sfn "$PWD/trainer" "$site/fastprime/trainer"
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

# Source at the start of every command on a GPU machine prepared by benchmarks/gpu_prepare.py:
#
#   . benchmarks/gpu_env.sh; bash benchmarks/gpu_session.sh $OUT/x STEPS
#
# Installs the carried wheels (.whl, needed in the first call on a fresh machine only: they stay in
# /tmp/mixerswap-site while the machine does) and sets PYTHONPATH, MIXERSWAP_SHARED_DATA (the carried .gpu/data),
# E2E_WORK (checkpoints shared by the calls) and unbuffered output. Returns non-zero when the wheels are missing.
site=/tmp/mixerswap-site
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
        >/dev/null 2>&1 && touch "$site/.installed"
fi
if [ ! -f "$site/.installed" ]; then
    echo "gpu_env.sh: the wheels are not installed: carry .whl (benchmarks/gpu_prepare.py) in this call" >&2
    return 1 2>/dev/null || exit 1
fi
export PYTHONPATH="$site:$PWD" MIXERSWAP_SHARED_DATA="$PWD/.gpu/data" PYTHONUNBUFFERED=1
export E2E_WORK=${E2E_WORK:-/tmp/mixerswap-e2e}

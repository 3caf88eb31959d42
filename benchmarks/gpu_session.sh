#!/usr/bin/env bash
# Everything that needs a GPU, in the order that matters, each step bounded so that a short session on a
# rented GPU comes back with results even when it ends early:
#
#   benchmarks/gpu_session.sh OUT_DIR [STEP ...]     # default: every step, in this order
#
# Steps (each writes OUT_DIR/<step>.log and its JSON; a step that runs out of time keeps what it measured):
#   tests          the whole suite on CUDA (tests/test_gpu.py included)                     ~5 min on an H100
#   kernels-check  our Triton kernels against the references at real sizes, forward and backward
#   e2e-targets    the three targets: batch 1 at 128K (pure Mamba-2 prefill) and batch 64 at 32K
#                  (25%-attention decode and cache) against the Llama-3.2-1B-shaped teacher; the teacher's
#                  cache there is 64 GiB: 2048-token prefill chunks (131K tokens per forward at batch 64) keep
#                  the activations beside it to a few GiB, so that it can fit an 80 GB GPU
#   e2e-kinds      every student kind at batch 1, 2K and 32K
#   distill        stories260k -> Mamba-2 50%, align/hidden/kd in bf16, loss curves against the CPU run
#                  (benchmarks/results/distill-cpu.json)
#   kernels-speed  kernel timings against the references (and mamba-ssm, causal-conv1d, fla when installed)
#   decode-overhead  batch-1 decode step of the teacher and every kind at 0% attention: ms/token, aten ops and
#                  host-device syncs per step, and a torch.profiler table of one step per model (top ops by CPU
#                  and CUDA time) in OUT_DIR/decode-profile*/; the tiny 16-layer model, then the 1B-shaped one,
#                  each also with the torch reference kernels instead of Triton (launch overhead at batch 1)
#   quality        SmolLM2 students distilled on a GPU budget (not in the default list: it needs the teacher's GGUF,
#                  98 MB, taken over in parts with benchmarks/gpu_stage.sh, and a training corpus from
#                  benchmarks/corpus.py --xz): quality.py --rows $QUALITY_ROWS (default mamba2-50) with
#                  $QUALITY_TOKENS (default 10M) tokens each, seq-len 1024, batch 32, bf16, teacher $QUALITY_TEACHER,
#                  training text $QUALITY_TRAIN_TEXT, held-out WikiText-2 from $MIXERSWAP_SHARED_DATA; rows accumulate
#                  in $E2E_WORK/quality/q.json (--append) and the report is copied to OUT_DIR; $QUALITY_OPTIONS are
#                  further quality.py options (later ones win: "--seq-len 256" overrides the 1024). A row stopped at
#                  the time limit keeps a checkpoint every 50 steps: the next call of this step continues it (--resume)
# Time limits per command of a step, in seconds: MIXERSWAP_GPU_LIMITS="tests=420 e2e-targets=480 ..." overrides the defaults.
# The e2e checkpoints (a 1B teacher and its students, ~30 GB) go to ${E2E_WORK:-/tmp/mixerswap-e2e}.
set -u
out=${1:?usage: benchmarks/gpu_session.sh OUT_DIR [STEP ...]}
shift
steps=${*:-tests kernels-check e2e-targets e2e-kinds distill kernels-speed decode-overhead}
mkdir -p "$out"
work=${E2E_WORK:-/tmp/mixerswap-e2e}
declare -A limit=([tests]=420 [kernels-check]=240 [e2e-targets]=480 [e2e-kinds]=300 [distill]=180 [kernels-speed]=300
                 [decode-overhead]=600 [quality]=540)
for pair in ${MIXERSWAP_GPU_LIMITS:-}; do limit[${pair%%=*}]=${pair#*=}; done
export PYTHONUNBUFFERED=1

run() {  # run STEP COMMAND...: bounded, logged, with its exit status and seconds
    local step=$1 began=$SECONDS
    shift
    timeout "${limit[$step]}" "$@" >>"$out/$step.log" 2>&1
    local status=$?
    echo "$step: exit $status after $((SECONDS - began)) s ($*)" | tee -a "$out/summary.txt"
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >"$out/device.txt" 2>&1
python -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'triton', triton.__version__, 'transformers', transformers.__version__)" >>"$out/device.txt" 2>&1
cat "$out/device.txt"
for step in $steps; do
    case $step in
        tests) OMP_NUM_THREADS=1 run tests python -m pytest -q -n 8 -p no:cacheprovider tests ;;
        kernels-check) run kernels-check python benchmarks/kernel_speed.py --check-only --out "$out/kernels-check.json" ;;
        e2e-targets)
            run e2e-targets python benchmarks/e2e_speed.py --workdir "$work" --students mamba2-25%,mamba2-0% \
                --batch 1 --context 128k --repeats 3 --json "$out/e2e-b1-128k.json"
            run e2e-targets python benchmarks/e2e_speed.py --workdir "$work" --students mamba2-25%,mamba2-0% \
                --batch 64 --context 32k --prefill-chunk 2048 --repeats 2 --json "$out/e2e-b64-32k.json" ;;
        e2e-kinds) run e2e-kinds python benchmarks/e2e_speed.py --workdir "$work" --batch 1 --context 2k,32k \
                --repeats 3 --json "$out/e2e-b1.json" --plot "$out/e2e-b1.png" ;;
        distill) run distill python benchmarks/distill_device.py --out "$out/distill-gpu.json" \
                --compare benchmarks/results/distill-cpu.json -q ;;
        kernels-speed) run kernels-speed python benchmarks/kernel_speed.py --batches 1 --seqlens 2048,32768 \
                --head-dims 64 --decode-batches 64 --repeats 10 --out "$out/kernels.json" ;;
        decode-overhead)  # the default kernels (Triton on CUDA), then the torch references: what launches cost
            run decode-overhead python benchmarks/decode_overhead.py --device cuda --dtype bfloat16 \
                --profile-dir "$out/decode-profile" --json "$out/decode-overhead.json"
            run decode-overhead python benchmarks/decode_overhead.py --device cuda --dtype bfloat16 --kernels torch \
                --json "$out/decode-overhead-torch-kernels.json"
            run decode-overhead python benchmarks/decode_overhead.py --device cuda --dtype bfloat16 --real \
                --workdir "$work" --profile-dir "$out/decode-profile-1b" --json "$out/decode-overhead-1b.json"
            run decode-overhead python benchmarks/decode_overhead.py --device cuda --dtype bfloat16 --real \
                --kinds mamba2,gdn --kernels torch --workdir "$work" \
                --json "$out/decode-overhead-1b-torch-kernels.json" ;;
        quality)
            mkdir -p "$work/quality"
            run quality python benchmarks/quality.py --teacher "${QUALITY_TEACHER:?the staged SmolLM2 GGUF}" \
                --text "${MIXERSWAP_SHARED_DATA:?}/text/wikitext2-test.raw" \
                --train-text "${QUALITY_TRAIN_TEXT:?corpus.jsonl.xz of benchmarks/corpus.py}" \
                --rows "${QUALITY_ROWS:-mamba2-50}" --tokens "${QUALITY_TOKENS:-10M}" --seq-len 1024 --batch-size 32 \
                --mixed-precision bf16 --workdir "$work/quality" --append --out "$work/quality/q.json" \
                --resume --checkpoint-every 50 \
                ${QUALITY_OPTIONS:-}
            cp "$work/quality/q.json" "$work/quality/q.png" "$out/" 2>/dev/null ;;
        *) echo "unknown step $step (tests kernels-check e2e-targets e2e-kinds distill kernels-speed" \
                "decode-overhead quality)" >&2
           exit 2 ;;
    esac
done
cat "$out/summary.txt"

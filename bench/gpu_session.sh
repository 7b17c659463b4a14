#!/usr/bin/env bash
# The GPU checks and benchmarks, stage by stage, in as few device calls as possible:
#   bash bench/gpu_session.sh smoke model switch          (about 5 minutes)
#   bash bench/gpu_session.sh overhead                    (a 7B decode step's host dispatch, XLA flag variants)
#   bash bench/gpu_session.sh floor                       (serve's 7B steps against their floors)
#   bash bench/gpu_session.sh profile                     (the same steps' GPU kernels by kind, from the profiler)
#   bash bench/gpu_session.sh cold-start                  (valora serve's start at 7B to its first answer)
#   bash bench/gpu_session.sh layout                      (a plain-JAX 7B decode step: weight layouts, scan vs loop)
#   bash bench/gpu_session.sh soak                        (valora serve under mixed load and faults; SOAK_MINUTES, 20)
#   bash bench/gpu_session.sh soak-start soak-wait        (the same in the background: it outlives the call, and
#                                                          calls of soak-wait that follow while the machine is
#                                                          warm bring its report back once it ended)
#   bash bench/gpu_session.sh copy                        (the rate a plain Pallas kernel streams memory at)
#   bash bench/gpu_session.sh adapter-copy                (one adapter's host-to-device copy, beside a serving loop)
#   bash bench/gpu_session.sh attention                   (prefill attention: GPU checks, then flash vs dense)
#   bash bench/gpu_session.sh decode                      (decode attention: GPU checks, then launches vs the floor)
#   bash bench/gpu_session.sh segment                     (the Qwen-VL tower's attention: GPU checks, then vs dense)
#   bash bench/gpu_session.sh tune                        (the tile sweep; split with TUNE_TOKENS=...)
#   bash bench/gpu_session.sh tune-merge switch           (the swift-merge tiles, then the switch with them)
#   bash bench/gpu_session.sh tune-mosaic                 (the Mosaic ATMM's and merge's tiles; the table's default kernels follow)
#   bash bench/gpu_session.sh mosaic                      (the Mosaic GPU ATMM's and merge's checks, a Hopper)
#   bash bench/gpu_session.sh kernels                     (ATMM side by side, both kernels on a Hopper)
#   bash bench/gpu_session.sh e2e                         (the end-to-end policy comparison; each call
#                                                          adds the workloads bench/results/e2e.json lacks;
#                                                          E2E_PRESET=qwen2.5-vl-7b: e2e_qwen2.5-vl-7b.json)
#   bash bench/gpu_session.sh e2e-start e2e-wait          (the same, one process a GPU in the background, each
#                                                          adding its share of the grid, E2E_ARGS_<gpu>; it
#                                                          outlives the call, and calls of e2e-wait that follow
#                                                          while the machine is warm bring its results back)
#   bash bench/gpu_session.sh loop-ab                     (ours and always-unmerged with decode loops of 1 and of 8
#                                                          steps a call, on a slice of e2e's workloads; --append)
#   bash bench/gpu_session.sh train   (resumable: unpack $OUT/checkpoints.tar.* here, carry checkpoints/.work)
# Packages the GPU machine lacks come as wheels in the git-ignored .whl/ (carry it): grain and its
# needs in .whl/ (installed into /tmp/site first), tokamax and its needs in .whl/tokamax/ (installed
# into /tmp/site-tokamax for the kernels stage alone), the HTTP server's in .whl/server/ (installed into
# /tmp/site-server for the soak stages alone); `bash bench/fetch_wheels.sh` fills it.
# Each stage's log goes to $OUT/<stage>.log; results land in bench/results/ and the tile table
# in pallas_kernels/configs/, and both are packed into $OUT/results.tgz (after each stage) to bring back.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
# compiled executables persist in the (git-ignored) repo while the machine stays warm, so a call
# that follows within its idle window skips recompiling the same steps
export JAX_COMPILATION_CACHE_DIR=$PWD/.jax_cache VALORA_XLA_CACHE=$PWD/.jax_cache
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0.5
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}   # the GPU is ours alone
OUT=${OUT:-/tmp/valora-gpu}
mkdir -p "$OUT" bench/results
if ls .whl/*.whl >/dev/null 2>&1; then            # once a machine: sessions may run side by side, one a GPU
    [ -e /tmp/site/.installed ] ||
        { python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl &&
              touch /tmp/site/.installed; } || exit
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
E2E_PRESET=${E2E_PRESET:-llava-1.5-7b}      # another preset's results are named after it (e2e_<preset>.*), or E2E_NAME
[ "$E2E_PRESET" = llava-1.5-7b ] && E2E_NAME=${E2E_NAME:-e2e} || E2E_NAME=${E2E_NAME:-e2e_$E2E_PRESET}
E2E="python3 bench/e2e.py --preset $E2E_PRESET --append"
E2E_DIR=/tmp/valora-$E2E_NAME   # the background e2e's results, outside the repo (each call's copy of it replaces tracked files)
SOAK="python3 bench/soak.py --minutes ${SOAK_MINUTES:-20}"
SOAK_DIR=/tmp/valora-soak   # the background soak's report and log, likewise
with_server() {             # runs "$@" with the HTTP server's packages importable
    if ls .whl/server/*.whl >/dev/null 2>&1 && [ ! -e /tmp/site-server/.installed ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site-server \
            .whl/server/*.whl && touch /tmp/site-server/.installed || return
    fi
    PYTHONPATH=/tmp/site-server:${PYTHONPATH:-} "$@"
}
python3 -c 'import jax; print(jax.__version__, jax.devices())'
# SESSION_DEADLINE_S: interrupt a stage this many seconds after the session began (set it below the
# device call's limit), so that what it saved so far is still packed below
deadline=$((SECONDS + ${SESSION_DEADLINE_S:-86400}))
for stage in "$@"; do
    echo "=== $stage $(date +%T)"
    left=$((deadline - SECONDS))
    if [ "$left" -le 10 ]; then echo "session deadline: stages from $stage on not run"; break; fi
    limit="timeout -s INT -k 20 $left"
    case $stage in
        smoke)   $limit python3 -m bench.gpu_smoke ${SMOKE_KERNELS:+--kernels $SMOKE_KERNELS} ;;
        model)   $limit python3 bench/model_smoke.py --out bench/results/model_smoke ;;
        overhead) $limit python3 bench/step_overhead.py --out bench/results/step_overhead \
                      ${OVERHEAD_VARIANTS:+--variants $OVERHEAD_VARIANTS} ;;
        floor)   $limit python3 bench/step_floor.py --out bench/results/step_floor ;;
        profile) $limit python3 bench/step_profile.py --out bench/results/step_profile --trace-dir "$OUT/traces" ;;
        cold-start) with_server $limit python3 bench/cold_start.py --out bench/results/cold_start ;;
        layout)  $limit python3 bench/layer_layout.py --out bench/results/layer_layout ;;
        soak)    with_server $limit $SOAK --out bench/results/soak_gpu ;;
        soak-start) mkdir -p $SOAK_DIR
                 with_server setsid nohup $SOAK --out $SOAK_DIR/soak_gpu </dev/null >$SOAK_DIR/soak.log 2>&1 &
                 sleep 2; echo "soak started for ${SOAK_MINUTES:-20} minutes" ;;
        soak-wait) while pgrep -f bench/soak.py >/dev/null && [ $((deadline - SECONDS)) -gt 20 ]; do sleep 5; done
                 pgrep -f bench/soak.py >/dev/null && echo "soak still running" || echo "soak ended"
                 tail -n 20 $SOAK_DIR/soak.log
                 cp $SOAK_DIR/soak_gpu.json $SOAK_DIR/soak_gpu.md bench/results/ 2>/dev/null || echo "no soak report yet" ;;
        copy)    $limit python3 bench/pallas_copy.py --out bench/results/pallas_copy ;;
        adapter-copy) $limit python3 bench/adapter_copy.py --out bench/results/adapter_copy ;;
        attention) $limit python3 -m bench.gpu_smoke --kernels attention &&
                     $limit python3 bench/prefill_attention.py --out bench/results/prefill_attention ;;
        decode)  $limit python3 -m bench.gpu_smoke --kernels decode &&
                     $limit python3 bench/decode_attention.py --out bench/results/decode_attention ;;
        mosaic)  $limit python3 -m bench.gpu_smoke --kernels mosaic ;;
        segment) $limit python3 -m bench.gpu_smoke --kernels segment &&
                     $limit python3 bench/segment_attention.py --out bench/results/segment_attention ;;
        switch)  $limit python3 bench/switch.py --preset llava-1.5-7b --rank 64 --out bench/results/switch ;;
        tune)    $limit python3 -m pallas_kernels.tune --budget-s "${TUNE_BUDGET_S:-480}" ${TUNE_TOKENS:+--tokens $TUNE_TOKENS} ;;
        tune-merge) $limit python3 -m pallas_kernels.tune --merge ;;
        tune-mosaic) $limit python3 -m pallas_kernels.tune --kernel mosaic --budget-s "${TUNE_BUDGET_S:-480}" \
                     ${TUNE_TOKENS:+--tokens $TUNE_TOKENS} &&
                 $limit python3 -m pallas_kernels.tune --kernel mosaic --merge ;;
        kernels) if ls .whl/tokamax/*.whl >/dev/null 2>&1; then
                     python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site-tokamax \
                         .whl/tokamax/*.whl
                 fi
                 PYTHONPATH=/tmp/site-tokamax:${PYTHONPATH:-} $limit python3 -m bench.kernels --out-dir bench/results \
                     --budget-s "${KERNELS_BUDGET_S:-480}" ;;
        train)   $limit python3 -m train.run_default --digits .whl/digits.npz \
                     --deadline-s "${TRAIN_DEADLINE_S:-540}"
                 skip=$([ -e checkpoints/.work/pretrain_done.json ] && echo checkpoints/.work/pretrain)  # done: not needed to resume
                 tar cf - ${skip:+--exclude=$skip} checkpoints bench/results/adapter_generation.* 2>/dev/null |
                     split -b 15M - "$OUT/checkpoints.tar." ;;
        e2e)     $limit $E2E --out bench/results/$E2E_NAME --deadline-s "${E2E_DEADLINE_S:-480}" \
                     --step-log "$OUT/${E2E_NAME}_steps.json" ${E2E_ARGS:-} ;;
        loop-ab) for loop in 1 8; do   # decode loops of 1 and 8 steps a call, on the same slice of workloads
                     $limit python3 bench/e2e.py --preset $E2E_PRESET --append --decode-loop $loop \
                         --out bench/results/e2e_decode_loop$loop --deadline-s "${E2E_DEADLINE_S:-200}" \
                         --requests 40 --warmup-requests 24 --policies ours,unmerged \
                         --workloads ${LOOP_AB_WORKLOADS:-vqa/poisson/hot80/6,vqa/bursty/uniform/10,video/poisson/hot80/6,video/poisson/zipf1.5/2}
                 done ;;
        e2e-start) mkdir -p $E2E_DIR      # the grid, and its step log, go on from what is committed
                 [ -e $E2E_DIR/$E2E_NAME.json ] || [ ! -e bench/results/$E2E_NAME.json ] ||
                     cp bench/results/$E2E_NAME.json $E2E_DIR/
                 [ -e $E2E_DIR/${E2E_NAME}_steps.json ] || [ ! -e bench/results/${E2E_NAME}_steps.json.gz ] ||
                     gunzip -c bench/results/${E2E_NAME}_steps.json.gz >$E2E_DIR/${E2E_NAME}_steps.json
                 # the processes compile their step variants at once, sharing the cores (one process
                 # compiling on every core and the others loading its executables from the
                 # compilation cache afterwards took longer: 288 s + 133 s against 255 s)
                 gpus=$(nvidia-smi -L | wc -l)
                 for gpu in $(seq 0 $((gpus - 1))); do
                     share=E2E_ARGS_$gpu
                     CUDA_VISIBLE_DEVICES=$gpu setsid nohup $E2E --out $E2E_DIR/$E2E_NAME --step-log $E2E_DIR/${E2E_NAME}_steps.json \
                         --compile-threads $(($(nproc) / gpus)) ${E2E_ARGS:-} ${!share:-} \
                         </dev/null >$E2E_DIR/gpu$gpu.log 2>&1 &
                     echo "e2e on GPU $gpu: ${E2E_ARGS:-} ${!share:-}"
                 done ;;
        e2e-wait) while pgrep -f bench/e2e.py >/dev/null && [ $((deadline - SECONDS)) -gt 20 ]; do sleep 5; done
                 pgrep -f bench/e2e.py >/dev/null && echo "e2e still running" || echo "e2e ended"
                 tail -n 12 $E2E_DIR/gpu*.log
                 cp $E2E_DIR/$E2E_NAME.json $E2E_DIR/$E2E_NAME.md $E2E_DIR/$E2E_NAME.png bench/results/ 2>/dev/null ||
                     echo "no e2e results yet"
                 if [ -e $E2E_DIR/${E2E_NAME}_steps.json ]; then  # the step log, and where the steps' time went
                     gzip -9 -c $E2E_DIR/${E2E_NAME}_steps.json >bench/results/${E2E_NAME}_steps.json.gz
                     python3 bench/e2e_steps.py bench/results/${E2E_NAME}_steps.json.gz \
                         --out bench/results/${E2E_NAME}_step_times >/dev/null
                 fi
                 tar czf "$OUT/e2e_logs.tgz" -C $E2E_DIR $(cd $E2E_DIR && ls gpu*.log 2>/dev/null) ;;
        *)       echo "unknown stage $stage"; false ;;
    esac 2>&1 | tee "$OUT/$stage.log"
    tar czf "$OUT/results.tgz" bench/results pallas_kernels/configs     # after every stage: a later one may time out
done
# the compiled executables this machine holds (what a later call on it skips compiling)
if [ -d .jax_cache ]; then echo "compilation cache: $(du -sh .jax_cache | cut -f1) in $(ls .jax_cache | wc -l) entries"; fi

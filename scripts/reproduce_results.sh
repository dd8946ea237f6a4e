#!/usr/bin/env bash
# Reproduces the figures of docs/results.md on the default benchmark. Finished runs are skipped.
#   scripts/reproduce_results.sh dsp     fine-tune; DSP pipelined and joint at k = 12, 24, 36
#   scripts/reproduce_results.sh sweep   the comparison of methods on both classification benchmarks
#   scripts/reproduce_results.sh speed   speed of the DSP models at k = 12, 36, 60 (after dsp)
#   scripts/reproduce_results.sh translation   the translation demo, the comparison of methods on
#                                        the Ding pairs and the generation speed (apt-get install trans-de-en)
#   scripts/reproduce_results.sh llm     SmolLM2-135M by KV group: every method, then the speed of DSP's
#                                        models (make llm-assets)
#   scripts/reproduce_results.sh today   the scored methods of issue 21 and reconstruction, on both
#                                        benchmarks and SmolLM2 (after sweep and llm)
#   scripts/reproduce_results.sh vision  a ViT trained from scratch on the digits, pruned by each method
#   scripts/reproduce_results.sh budgets speed targets with both allocations on MiniLM (subjectivity), a
#                                        translation model and SmolLM2, timed side by side (issue 24)
set -euo pipefail
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
HP=${HEADPRUNE:-headprune}
OUT=${OUT:-runs/results}
CFG=configs/rotten-tomatoes.yaml
run() { if [ -f "$1/results.json" ]; then echo "done: $1"; else $HP "${@:2}" --output-dir "$1"; fi; }
# The tables made before issue 21's defaults (FLAP's bias, the heads chosen for it, for DSP on text
# classifiers and for language models) and before DSP on text classifiers spread its heads over the
# layers (the eighteenth session): the same runs with --reconstruct none --allocation global (HP=before21),
# and with dropout on while DSP's scores learn (--default-rules 2: before the twenty-fifth session).
before21() { case "$1" in prune|sweep) ${HEADPRUNE:-headprune} "$@" --reconstruct none --allocation global --default-rules 2 ;;
                          *) ${HEADPRUNE:-headprune} "$@" ;; esac; }
# Issue 21's cells: the best other method's run at its validation setting (made in the `today` mode below)
declare -A BEST=([rt6]="$OUT/today-rt-michel-bias/michel-pipelined-s0 --k 6"
                 [rt12]="$OUT/today-rt-michel/michel-pipelined-s0 --k 12"
                 [rt24]="$OUT/today-rt-michel/michel-pipelined-s0 --k 24"
                 [rt36]="$OUT/today-rt-flap/flap-pipelined-k36-s0"
                 [subjectivity6]="$OUT/today-subjectivity-michel/michel-pipelined-s0 --k 6"
                 [subjectivity12]="$OUT/today-subjectivity-michel/michel-pipelined-s0 --k 12"
                 [subjectivity24]="$OUT/today-subjectivity-flap/flap-pipelined-k24-s0"
                 [subjectivity36]="$OUT/today-subjectivity-flap/flap-pipelined-k36-s0")
# paired FLAGS DSP CELL: benchmarks/paired.py on the examples FLAGS name (the test split if none), DSP's 3 seeds
# (the run folders DSP-s0, -s1, -s2) against the best other method's run of CELL
paired() { ${PYTHON:-python} benchmarks/paired.py $1 --a $2-s{0,1,2} --b ${BEST[$3]}; }

case "${1:-dsp}" in
  dsp)  # made before the default schedule changed: the reference's
    HP=before21
    run $OUT/finetune finetune --config $CFG
    for k in 12 24 36; do
      run $OUT/dsp-pipelined-k$k prune --config $CFG --mode pipelined --k $k --model $OUT/finetune/model --schedule reference
      run $OUT/dsp-joint-k$k prune --config $CFG --mode joint --k $k --schedule reference
    done ;;
  sweep)  # both benchmarks, the steady schedule (the default then) and (DSP) the reference's beside it
    HP=before21
    run $OUT/finetune finetune --config $CFG
    $HP sweep --config configs/sweep-rotten-tomatoes.yaml --model $OUT/finetune/model --schedule steady --output-dir $OUT/sweep
    $HP sweep --config configs/sweep-rotten-tomatoes.yaml --model $OUT/finetune/model --methods dsp \
      --ks 6 12 24 36 --schedule reference --output-dir $OUT/sweep-reference
    run $OUT/subjectivity/finetune finetune --config configs/subjectivity.yaml
    $HP sweep --config configs/sweep-subjectivity.yaml --model $OUT/subjectivity/finetune/model \
      --schedule steady --output-dir $OUT/sweep-subjectivity
    $HP sweep --config configs/sweep-subjectivity.yaml --model $OUT/subjectivity/finetune/model --methods dsp \
      --ks 6 12 24 36 --schedule reference --output-dir $OUT/sweep-subjectivity-reference
    # issue 25: 125-step pipelined runs (all 4,000 training snippets) at the steady and the reference
    # schedule, and steady with a constant rate for the scores or the select rate, at 125 and 32 steps
    R125="$HP sweep --config configs/sweep-rotten-tomatoes.yaml --model $OUT/finetune/model --methods dsp --seeds 0 1 2 --max-train-examples 4000"
    $R125 --ks 6 12 24 36 --schedule steady --output-dir $OUT/sweep125-steady
    $R125 --ks 6 12 24 36 --schedule reference --output-dir $OUT/sweep125-reference
    $R125 --ks 12 36 --schedule steady --pruning-lr-schedule constant --output-dir $OUT/sweep125-constant
    $R125 --ks 12 --schedule steady --pruning-lr-schedule select --output-dir $OUT/sweep125-select
    $R125 --ks 36 --seeds 0 --schedule steady --pruning-lr-schedule select --output-dir $OUT/sweep125-select
    R32="$HP sweep --config configs/sweep-rotten-tomatoes.yaml --model $OUT/finetune/model --methods dsp --schedule steady"
    $R32 --ks 6 12 24 36 --pruning-lr-schedule constant --output-dir $OUT/sweep-constant
    $R32 --ks 6 36 --pruning-lr-schedule select --output-dir $OUT/sweep-select
    $R32 --ks 12 24 --seeds 0 --pruning-lr-schedule select --output-dir $OUT/sweep-select
    S125="$HP sweep --config configs/sweep-subjectivity.yaml --model $OUT/subjectivity/finetune/model --methods dsp --max-train-examples 4000"
    $S125 --ks 6 12 24 36 --schedule reference --output-dir $OUT/sweep-subjectivity125-reference
    $S125 --ks 6 12 24 36 --schedule steady --output-dir $OUT/sweep-subjectivity125-steady
    $S125 --ks 6 12 --schedule steady --pruning-lr-schedule constant --output-dir $OUT/sweep-subjectivity125-constant
    # along one run: the heads kept per layer, the hard mask's validation accuracy, the noise gap
    T="${PYTHON:-python} benchmarks/schedule_trace.py --config $CFG --model $OUT/finetune/model --k 12 --seed 0 --max-train-examples 4000"
    $T --schedule steady --set reconstruct=none --output-dir $OUT/trace/steady
    $T --schedule reference --set reconstruct=none --output-dir $OUT/trace/reference
    # the same at --schedule steady with --set pruning_lr_schedule=constant or --set cooldown_fraction=0.3333 (own --output-dir)
    # DSP with a training budget that shrinks from every head to k (--shrink-fraction), both benchmarks
    for F in 0.5 1; do
      $HP sweep --config configs/sweep-rotten-tomatoes.yaml --model $OUT/finetune/model --methods dsp \
        --ks 6 12 24 --schedule steady --shrink-fraction $F --output-dir $OUT/sweep-shrink$F
      $HP sweep --config configs/sweep-subjectivity.yaml --model $OUT/subjectivity/finetune/model --methods dsp \
        --ks 6 12 24 --schedule steady --shrink-fraction $F --output-dir $OUT/sweep-subjectivity-shrink$F
    done
    # what the methods optimise (cross-entropy) beside what is reported (accuracy), for the same heads
    for S in $OUT/sweep $OUT/sweep-subjectivity; do
      ${PYTHON:-python} benchmarks/loss_and_accuracy.py $S/dsp-pipelined-k*-s0 $S/ste-pipelined-k*-s0 $S/michel-pipelined-s0
    done
    ${PYTHON:-python} benchmarks/loss_and_accuracy.py $OUT/sweep-subjectivity-shrink1/dsp-pipelined-k*-s0
    # joint: fine-tune MiniLM-L6 and learn the heads together (4,000 snippets, one epoch), at the
    # default (DSP's budget shrinking to k in the first third, the last two thirds settled), DSP
    # before the shrink, at the reference schedule, and before the settle existed
    J="$HP sweep --config configs/sweep-rotten-tomatoes.yaml --modes joint --max-train-examples 4000 --ks 6 24"
    $J --methods dsp ste voita --output-dir $OUT/sweep-joint
    $J --methods dsp ste --ks 24 --seeds 3 4 --output-dir $OUT/sweep-joint
    $J --methods dsp --shrink-fraction 0 --output-dir $OUT/sweep-joint-no-shrink  # DSP before the shrink
    $J --methods dsp --shrink-fraction 0 --ks 24 --seeds 3 4 --output-dir $OUT/sweep-joint-no-shrink
    $J --methods voita --l0-lambda 0.0001 --output-dir $OUT/sweep-joint-voita-small-lambda
    $J --methods dsp --schedule reference --output-dir $OUT/sweep-joint-reference
    $J --methods dsp ste --settle-fraction 0.3333 --shrink-fraction 0 --output-dir $OUT/sweep-joint-settle-third
    $J --methods dsp ste voita --settle-fraction 0 --shrink-fraction 0 --output-dir $OUT/sweep-joint-unsettled
    $J --methods voita --l0-lambda 0.0001 --settle-fraction 0 --output-dir $OUT/sweep-joint-unsettled-voita-small-lambda
    # joint on subjectivity, the same way
    JS="$HP sweep --config configs/sweep-subjectivity.yaml --modes joint --max-train-examples 4000 --ks 6 24"
    $JS --methods dsp ste --output-dir $OUT/sweep-subjectivity-joint
    $JS --methods dsp --shrink-fraction 0 --output-dir $OUT/sweep-subjectivity-joint-no-shrink
    $JS --methods voita --l0-lambda 0.0001 --output-dir $OUT/sweep-subjectivity-joint-voita-small-lambda
    # a short fine-tuning of the pruned models (32 steps on the pruning data) before and after
    ${PYTHON:-python} benchmarks/recovery_finetune.py $OUT/sweep-subjectivity/dsp-pipelined-k{6,12,24}-s{0,1,2} \
      $OUT/sweep-subjectivity/michel-pipelined-s0 --ks 6 12 24 --output-dir $OUT/recovery-subjectivity ;;
  speed)
    HP=before21
    run $OUT/dsp-pipelined-k60 prune --config $CFG --mode pipelined --k 60 --model $OUT/finetune/model --schedule reference
    for k in 12 36 60; do
      [ -f $OUT/dsp-pipelined-k$k/speed/measure.md ] || \
        $HP measure --pruned $OUT/dsp-pipelined-k$k/model --threads 2 --output-dir $OUT/dsp-pipelined-k$k/speed
    done
    # memory and time of a backward pass with --activation-checkpointing: a DSP step with dropout (the
    # twenty-sixth session) and without, Michel's and Fisher's gradients, Taylor's (the twenty-seventh)
    for how in "--method dsp --dropout on" "--method dsp" "--method fisher" "--method taylor"; do
      ${PYTHON:-python} benchmarks/activation_memory.py $how --batch-size 8 --length 512 --steps 5 --repeats 2
    done ;;
  translation)
    MT=${OUT}/translation
    $HP demo --task translation --output-dir $MT
    $HP sweep --config configs/sweep-ding-de-en.yaml --model $MT/finetune/model --output-dir $MT/sweep \
      --schedule reference --pruning-lr 0.2
    # below a quarter of the heads, three seeds (Michel's curve needs a step that lands on 4)
    $HP sweep --config configs/sweep-ding-de-en.yaml --model $MT/finetune/model --output-dir $MT/sweep-k4 \
      --schedule reference --pruning-lr 0.2 --ks 4 --seeds 0 1 2 --michel-step 4
    # DSP at its default and with FLAP's bias, its heads chosen for it (the twenty-fourth session)
    $HP sweep --config configs/sweep-ding-de-en.yaml --model $MT/finetune/model --methods dsp --ks 18 9 27 --seeds 0 1 \
      --output-dir $MT/dsp-none
    $HP sweep --config configs/sweep-ding-de-en.yaml --model $MT/finetune/model --methods dsp --ks 18 9 27 --seeds 0 1 \
      --reconstruct bias --ablation mean --output-dir $MT/dsp-mean-bias
    # and without dropout while the scores learn (the twenty-fifth session)
    $HP sweep --config configs/sweep-ding-de-en.yaml --model $MT/finetune/model --methods dsp --ks 18 9 27 --seeds 0 1 \
      --pruning-dropout off --output-dir $MT/dsp-nodrop
    [ -f $MT/dsp-pipelined-k18/speed/measure.md ] || \
      $HP measure --pruned $MT/dsp-pipelined-k18/model --threads 2 --batch-sizes 1 16 --lengths 16 \
        --beams 1 5 --generate-tokens 24 --output-dir $MT/dsp-pipelined-k18/speed ;;
  llm)  # made before language models were reconstructed by default (issue 21): --reconstruct none
    $HP sweep --config configs/sweep-smollm2.yaml --reconstruct none --output-dir $OUT/smollm2
    # DSP at the reference's schedule beside it (issue 25: language models keep steady)
    $HP sweep --config configs/sweep-smollm2.yaml --methods dsp --schedule reference --reconstruct none \
      --output-dir $OUT/smollm2-reference
    for k in 45 30; do
      [ -f $OUT/smollm2/dsp-pipelined-k$k-s0/speed/measure.md ] || \
        $HP measure --pruned $OUT/smollm2/dsp-pipelined-k$k-s0/model --threads 1 --batch-sizes 1 8 \
          --lengths 128 --beams 1 --generate-tokens 32 --repeats 5 --output-dir $OUT/smollm2/dsp-pipelined-k$k-s0/speed
    done
    # issue 22: the pruned model in llama.cpp (needs llama-cpp-python): same tokens, KV cache, speed
    ${PYTHON:-python} benchmarks/llamacpp.py $OUT/smollm2/dsp-pipelined-k45-s0/model \
      --output-dir $OUT/smollm2/dsp-pipelined-k45-s0/llamacpp
    # the same groups in every layer, written as a plain transformers model (the twenty-second session)
    $HP sweep --config configs/sweep-smollm2.yaml --methods dsp --ks 60 --seeds 0 --allocation uniform \
      --output-dir $OUT/smollm2-uniform
    [ -d $OUT/smollm2-uniform/plain ] || $HP export --format transformers \
      --model $OUT/smollm2-uniform/dsp-pipelined-k60-s0/model --output $OUT/smollm2-uniform/plain ;;
  today)  # issue 21: the scored methods (Kwon, Minitron, FLAP, LLM-Pruner) with and without reconstruction
    run $OUT/finetune finetune --config $CFG
    run $OUT/subjectivity/finetune finetune --config configs/subjectivity.yaml
    # one run gives the heads without reconstruction and with FLAP's bias (two rows of the sweep)
    $HP sweep --config configs/sweep-rotten-tomatoes.yaml --model $OUT/finetune/model --max-train-examples 4000 \
      --methods fisher activation flap taylor random michel --reconstruct bias --output-dir $OUT/today-rt
    $HP sweep --config configs/sweep-subjectivity.yaml --model $OUT/subjectivity/finetune/model --max-train-examples 4000 \
      --methods fisher activation flap taylor random michel --reconstruct bias --output-dir $OUT/today-subjectivity
    # STE and Voita (seeds 0-2), their heads chosen at zero, without and with the bias (two rows of the sweep)
    T="--methods ste voita --max-train-examples 4000 --reconstruct bias --ablation zero"
    $HP sweep --config configs/sweep-rotten-tomatoes.yaml --model $OUT/finetune/model $T --output-dir $OUT/today-rt-trained
    $HP sweep --config configs/sweep-subjectivity.yaml --model $OUT/subjectivity/finetune/model $T \
      --output-dir $OUT/today-subjectivity-trained
    $HP sweep --config configs/sweep-smollm2.yaml --methods fisher activation flap taylor dsp --ks 30 45 60 \
      --reconstruct bias --ablation zero --output-dir $OUT/today-smollm2
    $HP sweep --config configs/sweep-smollm2.yaml --methods michel --michel-normalize none --ks 30 45 60 \
      --reconstruct bias --output-dir $OUT/today-smollm2-michel-raw
    # the heads chosen for the model the bias saves (--ablation mean; DSP's default for language models)
    $HP sweep --config configs/sweep-smollm2.yaml --methods dsp --ks 30 45 60 --output-dir $OUT/today-smollm2-mean
    $HP sweep --config configs/sweep-smollm2.yaml --methods dsp --ks 30 45 60 --seeds 0 1 2 --output-dir $OUT/smollm2-dsp-seeds
    $HP sweep --config configs/sweep-smollm2.yaml --methods fisher --ks 30 45 60 --ablation mean \
      --output-dir $OUT/today-smollm2-mean-fisher
    $HP sweep --config configs/sweep-smollm2.yaml --methods michel --michel-normalize none --ks 30 45 60 \
      --ablation mean --output-dir $OUT/today-smollm2-mean-michel
    for k in 45 60; do  # Michel with the bias at its final k: one run per k
      $HP sweep --config configs/sweep-smollm2.yaml --methods michel --michel-normalize none --ks $k \
        --reconstruct bias --output-dir $OUT/today-smollm2-michel-raw-k$k
    done
    # DSP at its default (the heads chosen for the bias; seeds 0-2) and with its heads removed (+ Kwon's rescale; seed 0)
    # (the former default: one budget over all layers; the default from 2 heads a layer since the eighteenth session: uniform)
    R="--methods dsp --max-train-examples 4000 --ks 6 12 24 36 --default-rules 2"  # dropout on, as before the 25th session
    $HP sweep --config configs/sweep-rotten-tomatoes.yaml --model $OUT/finetune/model $R --allocation global --output-dir $OUT/rt-mean
    $HP sweep --config configs/sweep-subjectivity.yaml --model $OUT/subjectivity/finetune/model $R --allocation global \
      --output-dir $OUT/subjectivity-mean
    # the same number of heads in every layer (seeds 0-2)
    $HP sweep --config configs/sweep-rotten-tomatoes.yaml --model $OUT/finetune/model $R --allocation uniform \
      --output-dir $OUT/rt-mean-uniform
    $HP sweep --config configs/sweep-subjectivity.yaml --model $OUT/subjectivity/finetune/model $R --allocation uniform \
      --output-dir $OUT/subjectivity-mean-uniform
    # three heads a layer (18 of 72) both ways, 3 seeds (the nineteenth session: the default's --uniform-from 3)
    for a in global uniform; do
      if [ $a = uniform ]; then suffix=-uniform; else suffix=; fi
      $HP sweep --config configs/sweep-rotten-tomatoes.yaml --model $OUT/finetune/model $R --ks 18 --allocation $a \
        --output-dir $OUT/rt-mean$suffix
      $HP sweep --config configs/sweep-subjectivity.yaml --model $OUT/subjectivity/finetune/model $R --ks 18 \
        --allocation $a --output-dir $OUT/subjectivity-mean$suffix
    done
    $HP sweep --config configs/sweep-rotten-tomatoes.yaml --model $OUT/finetune/model $R --seeds 0 --reconstruct rescale \
      --allocation global --output-dir $OUT/sweep125-reference-s0
    $HP sweep --config configs/sweep-subjectivity.yaml --model $OUT/subjectivity/finetune/model $R --seeds 0 --reconstruct none \
      --allocation global --output-dir $OUT/sweep-subjectivity125-reference-s0
    ${PYTHON:-python} benchmarks/targets.py $OUT/rt-mean $OUT/today-rt $OUT/today-rt-trained --ks 6 12 24 36 \
      --dsp "dsp (mean ablation) + bias"
    ${PYTHON:-python} benchmarks/targets.py $OUT/subjectivity-mean $OUT/today-subjectivity $OUT/today-subjectivity-trained \
      --ks 6 12 24 36 \
      --dsp "dsp (mean ablation) + bias"
    # every reconstruction mode on the heads DSP chose at 125 steps (the sweep mode's sweep125-reference)
    ${PYTHON:-python} benchmarks/reconstruction.py $OUT/sweep125-reference/dsp-pipelined-k*-s0 \
      --modes rescale both --calibration-examples 1000
    # FLAP's bias on the heads DSP chose at zero, on all the calibration data (both classifiers)
    ${PYTHON:-python} benchmarks/reconstruction.py $OUT/sweep125-reference/dsp-pipelined-k*-s0 --modes bias
    ${PYTHON:-python} benchmarks/reconstruction.py $OUT/sweep-subjectivity125-reference-s0/dsp-pipelined-k*-s0 --modes bias
    # the nineteenth session: Kwon's scales with the bias on the default's heads; three epochs; the steady schedule; lr
    ${PYTHON:-python} benchmarks/reconstruction.py $OUT/rt-mean-uniform/dsp-pipelined-k{12,24,36}-s0 --modes both
    ${PYTHON:-python} benchmarks/reconstruction.py $OUT/subjectivity-mean-uniform/dsp-pipelined-k{24,36}-s0 --modes both
    for more in "--epochs 3" "--schedule steady" "--pruning-lr 0.2" "--pruning-lr 1.0"; do
      $HP sweep --config configs/sweep-rotten-tomatoes.yaml --model $OUT/finetune/model $R --ks 24 --seeds 0 $more \
        --output-dir "$OUT/rt-24-${more//[- ]/}"
      $HP sweep --config configs/sweep-subjectivity.yaml --model $OUT/subjectivity/finetune/model $R --ks 24 --seeds 0 $more \
        --output-dir "$OUT/subjectivity-24-${more//[- ]/}"
    done
    # the twentieth session: the scores learn from the unpruned model's predictions; all the training data
    for more in "--pruning-loss distill" "--max-train-examples 100000"; do
      $HP sweep --config configs/sweep-rotten-tomatoes.yaml --model $OUT/finetune/model $R --ks 12 24 --seeds 0 $more \
        --output-dir "$OUT/rt-${more//[- ]/}"
      $HP sweep --config configs/sweep-subjectivity.yaml --model $OUT/subjectivity/finetune/model $R --ks 24 36 --seeds 0 \
        $more --output-dir "$OUT/subjectivity-${more//[- ]/}"
    done
    $HP sweep --config configs/sweep-smollm2.yaml --methods dsp --ks 30 60 --seeds 0 --pruning-loss distill \
      --output-dir $OUT/smollm2-distill
    # the missed cells paired over the test examples: the other methods' runs made again, DSP's 3 seeds
    $HP sweep --config configs/sweep-rotten-tomatoes.yaml --model $OUT/finetune/model --max-train-examples 4000 \
      --methods michel --ks 12 24 --output-dir $OUT/today-rt-michel
    $HP sweep --config configs/sweep-subjectivity.yaml --model $OUT/subjectivity/finetune/model --max-train-examples 4000 \
      --methods flap --ks 24 36 --seeds 0 --reconstruct bias --output-dir $OUT/today-subjectivity-flap
    $HP sweep --config configs/sweep-rotten-tomatoes.yaml --model $OUT/finetune/model $R --ks 12 --seeds 0 1 2 \
      --allocation global --output-dir $OUT/rt-mean
    paired "" $OUT/rt-mean/dsp-pipelined-k12 rt12
    paired "" $OUT/rt-mean-uniform/dsp-pipelined-k24 rt24
    for k in 24 36; do paired "" $OUT/subjectivity-mean-uniform/dsp-pipelined-k$k subjectivity$k; done
    # subjectivity at 6 heads (the twenty-first session): Michel's curve, DSP's 3 seeds (global at 1 head a layer)
    $HP sweep --config configs/sweep-subjectivity.yaml --model $OUT/subjectivity/finetune/model --max-train-examples 4000 \
      --methods michel --ks 6 --output-dir $OUT/today-subjectivity-michel
    $HP sweep --config configs/sweep-subjectivity.yaml --model $OUT/subjectivity/finetune/model $R --ks 6 --seeds 0 1 2 \
      --allocation global --output-dir $OUT/subjectivity-mean
    paired "" $OUT/subjectivity-mean/dsp-pipelined-k6 subjectivity6
    # the twenty-second session: the same comparisons on the training examples nothing learned from, pooled with
    # test (and the unseen ones alone: --split unseen-train); subjectivity at 12 heads, Rotten Tomatoes at 36
    $HP sweep --config configs/sweep-subjectivity.yaml --model $OUT/subjectivity/finetune/model $R --ks 12 --seeds 0 1 2 \
      --allocation global --output-dir $OUT/subjectivity-mean
    $HP sweep --config configs/sweep-rotten-tomatoes.yaml --model $OUT/finetune/model --max-train-examples 4000 \
      --methods flap --ks 36 --seeds 0 --reconstruct bias --output-dir $OUT/today-rt-flap
    POOLED="--split test unseen-train --unseen-from 4000"
    for U in "$POOLED" "$POOLED --resample-runs"; do  # the twenty-third session: the seeds' spread in the interval too
      paired "$U" $OUT/rt-mean/dsp-pipelined-k12 rt12
      for k in 24 36; do paired "$U" $OUT/rt-mean-uniform/dsp-pipelined-k$k rt$k; done
      for k in 6 12; do paired "$U" $OUT/subjectivity-mean/dsp-pipelined-k$k subjectivity$k; done
      for k in 24 36; do paired "$U" $OUT/subjectivity-mean-uniform/dsp-pipelined-k$k subjectivity$k; done
    done
    # the twenty-third session: Rotten Tomatoes at 6 heads pooled (Michel's curve with the bias, DSP's global 3 seeds)
    $HP sweep --config configs/sweep-rotten-tomatoes.yaml --model $OUT/finetune/model --max-train-examples 4000 \
      --methods michel --ks 6 --reconstruct bias --output-dir $OUT/today-rt-michel-bias
    $HP sweep --config configs/sweep-rotten-tomatoes.yaml --model $OUT/finetune/model $R --ks 6 --seeds 0 1 2 \
      --allocation global --output-dir $OUT/rt-mean
    for split in test "test unseen-train" "test unseen-train --resample-runs"; do
      paired "--split $split --unseen-from 4000" $OUT/rt-mean/dsp-pipelined-k6 rt6
    done
    # the twenty-fifth session: DSP's default without dropout while its scores learn (3 seeds), pooled as above
    N="--methods dsp --max-train-examples 4000 --ks 6 12 24 36 --seeds 0 1 2"
    $HP sweep --config configs/sweep-rotten-tomatoes.yaml --model $OUT/finetune/model $N --output-dir $OUT/rt-nodrop
    $HP sweep --config configs/sweep-subjectivity.yaml --model $OUT/subjectivity/finetune/model $N --output-dir $OUT/subjectivity-nodrop
    for benchmark in rt subjectivity; do
      for k in 6 12 24 36; do paired "$POOLED" $OUT/$benchmark-nodrop/dsp-pipelined-k$k $benchmark$k; done
    done
    # the twenty-sixth session: Kwon's scales with the bias on the two cells still short; what the pruning data ranks;
    # STE and Voita with and without dropout at 24 heads
    for m in ste voita; do for d in on off; do
      $HP sweep --config configs/sweep-rotten-tomatoes.yaml --model $OUT/finetune/model --methods $m --max-train-examples 4000 \
        --ks 24 --seeds 0 --pruning-dropout $d --output-dir $OUT/rt-$m-dropout-$d
      $HP sweep --config configs/sweep-subjectivity.yaml --model $OUT/subjectivity/finetune/model --methods $m \
        --max-train-examples 4000 --ks 24 --seeds 0 --pruning-dropout $d --output-dir $OUT/subjectivity-$m-dropout-$d
    done; done
    ${PYTHON:-python} benchmarks/reconstruction.py $OUT/subjectivity-nodrop/dsp-pipelined-k{6,24}-s0 --modes bias both
    ${PYTHON:-python} benchmarks/loss_and_accuracy.py $OUT/subjectivity-nodrop/dsp-pipelined-k6-s1 \
      $OUT/today-subjectivity-michel/michel-pipelined-s0 $OUT/subjectivity-nodrop/dsp-pipelined-k24-s1 \
      $OUT/today-subjectivity-flap/flap-pipelined-k24-s0 --ks 6
    # why DSP trails FLAP with its bias at 36 heads on subjectivity: loss and accuracy on the pruning data and on test
    ${PYTHON:-python} benchmarks/loss_and_accuracy.py $OUT/subjectivity-mean-uniform/dsp-pipelined-k36-s{0,1,2} \
      $OUT/today-subjectivity-flap/flap-pipelined-k36-s0
    ${PYTHON:-python} benchmarks/targets.py $OUT/today-smollm2 $OUT/today-smollm2-michel-raw* $OUT/smollm2 \
      $OUT/today-smollm2-mean $OUT/today-smollm2-mean-fisher $OUT/today-smollm2-mean-michel \
      --dsp "dsp (mean ablation) + bias" --lower-is-better --ks 30 45 60 ;;
  vision)  # issue 23: image classification (scikit-learn's digits; no pretrained image model offline)
    run $OUT/vit finetune --config configs/digits-vit.yaml
    $HP sweep --config configs/sweep-digits-vit.yaml --model $OUT/vit/model --default-rules 1 --output-dir $OUT/sweep-digits-vit
    # the twenty-fourth session: DSP with and without FLAP's bias (3 seeds), the scored methods before and after it
    V="--config configs/sweep-digits-vit.yaml --model $OUT/vit/model"
    $HP sweep $V --methods dsp --seeds 0 1 2 --default-rules 1 --output-dir $OUT/vit-none
    $HP sweep $V --methods dsp --seeds 0 1 2 --reconstruct bias --ablation mean --output-dir $OUT/vit-mean-bias
    $HP sweep $V --methods michel fisher flap random --reconstruct bias --output-dir $OUT/vit-others-bias
    $HP sweep $V --methods dsp --seeds 0 1 2 --ks 8 12 --reconstruct bias --ablation mean --allocation uniform \
      --output-dir $OUT/vit-mean-bias-uniform ;;
  budgets)  # issue 24; needs an idle machine (timings); trans-de-en for the translation model, make llm-assets
    run $OUT/subjectivity/finetune finetune --config configs/subjectivity.yaml
    ST="${PYTHON:-python} benchmarks/speed_targets.py --reconstruct none --default-rules 2"  # made before issue 21's defaults
    M="--config configs/sweep-subjectivity.yaml --model $OUT/subjectivity/finetune/model --methods fisher dsp --max-eval-examples 1000"
    $ST $M --attn-implementation sdpa --at-batch-size 32 --at-length 64 --output-dir $OUT/speed-targets/minilm-subjectivity
    $ST $M --attn-implementation sdpa --at-batch-size 32 --at-length 128 --output-dir $OUT/speed-targets/minilm-subjectivity-128
    $ST $M --at-batch-size 32 --at-length 64 --output-dir $OUT/speed-targets/minilm-subjectivity-eager
    $ST $M --targets 1.6 --attn-implementation sdpa --at-batch-size 8 --at-length 256 \
      --output-dir $OUT/speed-targets/minilm-subjectivity-256-r20
    run $OUT/translation3/finetune finetune --config configs/ding-de-en.yaml --epochs 3
    $ST --config configs/sweep-ding-de-en.yaml --model $OUT/translation3/finetune/model --methods fisher dsp \
      --targets 1.2 1.4 --max-train-examples 3000 --max-eval-examples 500 --at-batch-size 32 --at-length 64 \
      --at-new-tokens 32 --output-dir $OUT/speed-targets/translation-b32-checked
    $ST --config configs/sweep-smollm2.yaml --methods fisher --max-eval-examples 100 --at-batch-size 1 \
      --at-length 512 --at-new-tokens 32 --output-dir $OUT/speed-targets/smollm2-512 ;;
  *) echo "usage: $0 dsp|sweep|speed|translation|llm|today|vision|budgets" >&2; exit 2 ;;
esac

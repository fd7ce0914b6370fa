#!/usr/bin/env bash
# The checks only a CUDA GPU can run, in one go: the pretraining benchmark at the ~350M preset's shape in
# bf16 (eager, then compiled; MFU against a measured bf16 matmul peak), then the gpu-marked tests (bf16
# pretraining, QLoRA with bitsandbytes). Every check runs even when one fails; the exit status is 1 if any did.
#   pip install -r requirements.txt -r requirements-gpu.txt -e . && bash tests/run_gpu.sh
#   BATCH_SIZE=32 COMPILE=true bash tests/run_gpu.sh   # another batch size, compiled only
# Writes the benchmark JSONs to $GPU_RESULTS_DIR (default outputs/gpu_checks). CI has no GPU: there the
# gpu tests skip, and this script is not run.
set -uo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python}
results=${GPU_RESULTS_DIR:-outputs/gpu_checks}
mkdir -p "$results"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
"$python" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" || exit 1
failed=0

# recipes/pretrain/llama_350m_fineweb.yaml: its hyperparameters (read by the benchmark) and its shape (below).
shape_350m=(--recipe_config recipes/pretrain/llama_350m_fineweb.yaml --hidden_size 1024 --intermediate_size 2816
            --num_hidden_layers 24 --num_attention_heads 16 --num_key_value_heads 16 --tie_word_embeddings true
            --max_position_embeddings 2048 --rope_theta 500000 --vocab_size 32768 --seq_len 2048
            --batch_size "${BATCH_SIZE:-16}" --bf16 true --rounds 1 --warmup_steps 5 --timed_steps 10)
for compile in ${COMPILE:-false true}; do
    echo "=== 350M benchmark, bf16, torch_compile $compile"
    "$python" recipes/pretrain/benchmark.py "${shape_350m[@]}" --torch_compile "$compile" \
        --output_json "$results/mfu_350m_compile_$compile.json" || failed=1
done

echo "=== gpu-marked tests"
"$python" -m pytest tests/test_gpu.py -q -p no:cacheprovider -rA || failed=1
exit $failed

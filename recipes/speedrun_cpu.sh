#!/usr/bin/env bash
# The embedded-default chain on a CPU, from a fresh clone: install, build the corpus from the
# Python standard library, train the tokenizer, pack, pretrain the tiny model, fine-tune it on
# generated chat tasks (SFT), train a reward model from it, improve the SFT policy with PPO against
# it, evaluate the three checkpoints and render the report, summarise.
#
#   bash recipes/speedrun_cpu.sh            # everything lands in outputs/
#
# Every step is a real recipe with its defaults; run them one by one to change settings.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
python -m pip install -q -r requirements.txt -e . 2>&1 | grep -v -E "^WARNING: Running pip as the 'root'|^\[notice\]" || true
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false HF_DATASETS_DISABLE_PROGRESS_BARS=1
installed=$(date +%s)

step() { echo; echo "=== $1 (at $(( $(date +%s) - installed )) s)"; }
step "1/11 corpus (embedded default: Python standard library)"
python -m data_prep.build_corpus --output_dir outputs/corpus
step "2/11 tokenizer (byte-level BPE)"
python -m data_prep.train_tokenizer --corpus_dir outputs/corpus --output_dir outputs/tokenizer
step "3/11 tokenize and pack"
python -m data_prep.pack_dataset --corpus_dir outputs/corpus --tokenizer_dir outputs/tokenizer --output_dir outputs/packed
step "4/11 pretrain the tiny preset"
accelerate launch --config_file accelerate_configs/cpu.yaml recipes/pretrain/pretrain.py \
    --config recipes/pretrain/tiny.yaml --disable_tqdm true

step "5/11 SFT data (generated chat tasks)"
python -m data_prep.build_sft_data --output_dir outputs/sft_data
step "6/11 SFT (full fine-tuning, loss on assistant turns)"
accelerate launch --config_file accelerate_configs/cpu.yaml recipes/sft/sft.py \
    --config recipes/sft/tiny.yaml --disable_tqdm true
step "7/11 preference pairs"
python -m data_prep.build_preference_data --sft_data_dir outputs/sft_data --output_dir outputs/preference_data
step "8/11 reward model"
accelerate launch --config_file accelerate_configs/cpu.yaml recipes/reward/reward.py \
    --config recipes/reward/tiny.yaml --disable_tqdm true

step "9/11 PPO (policy from SFT, critic from the reward model, KL penalty to the SFT model)"
accelerate launch --config_file accelerate_configs/cpu.yaml recipes/rl/ppo.py \
    --config recipes/rl/ppo_tiny.yaml --disable_tqdm true
echo "(the other RL methods on the same inputs:"
echo "  accelerate launch --config_file accelerate_configs/cpu.yaml recipes/rl/grpo.py --config recipes/rl/grpo_tiny.yaml"
echo "  accelerate launch --config_file accelerate_configs/cpu.yaml recipes/rl/rloo.py --config recipes/rl/rloo_tiny.yaml"
echo "  accelerate launch --config_file accelerate_configs/cpu.yaml recipes/rl/dpo.py --config recipes/rl/dpo_tiny.yaml)"
step "10/11 evaluation (pretrained, SFT and PPO checkpoints)"
python -m data_prep.build_mc_benchmark --output_dir outputs/mc_benchmark
python recipes/eval/eval.py --config recipes/eval/tiny.yaml --model_name_or_path outputs/pretrain_tiny \
    --metrics perplexity bleu_rouge exact_match lm_eval safety --output_dir outputs/eval_pretrain_tiny
python recipes/eval/eval.py --config recipes/eval/tiny.yaml
python recipes/eval/eval.py --config recipes/eval/tiny.yaml --model_name_or_path outputs/ppo_tiny \
    --compare_model_name_or_path outputs/sft_tiny --output_dir outputs/eval_ppo_tiny
step "11/11 report"
python -m recipes.eval.report outputs --output_dir outputs/report

step "summary"
python -m recipes.summary outputs
end=$(date +%s)
echo "wall time: $((end - installed)) s for the chain (+ $((installed - start)) s install)"

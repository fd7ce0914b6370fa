"""Throughput benchmark: the pretraining recipe's Trainer path against a bare PyTorch loop.

    # CPU, fp32, 7.34M-param Llama, batch 8 x 256 tokens: 3 rounds x 2 contenders x (3 + 12) steps,
    # about 2 minutes on 2 idle cores (several times longer when other jobs share the cores)
    python recipes/pretrain/benchmark.py

    # other shapes or lengths; results also as JSON
    python recipes/pretrain/benchmark.py --hidden_size 384 --num_hidden_layers 6 --batch_size 4 \
        --timed_steps 20 --rounds 5 --output_json outputs/benchmark.json

    # CUDA, bf16 autocast (peak = measured bf16 matmul on the GPU)
    python recipes/pretrain/benchmark.py --bf16 true --batch_size 32 --seq_len 1024

    # the ~350M preset's shape and hyperparameters in bf16 on one GPU, eager and compiled: its flags are in
    bash tests/run_gpu.sh

What it measures. One model built by the recipe's own `build_config` (shape flags are the recipe's
ArchitectureArguments; the default is a Llama with hidden 256, 4 layers, 4 heads, intermediate 768,
untied embeddings and --vocab_size 7680: 7.34M parameters), trained on the same random token
batches (torch.randint, so no dataset, tokenizer or network is needed) by two contenders:
  A. recipe: `ThroughputTrainer` from recipes/pretrain/pretrain.py with its ThroughputMeter, and
     TrainingArguments parsed by the recipe's own parser from --recipe_config (default
     recipes/pretrain/tiny.yaml: optim, lr, cosine schedule, warmup, weight decay, betas,
     max_grad_norm 1.0, fp32). Overridden only: batch size, max_steps, and off for logging,
     saving, evaluation (eval_on_start too), tqdm and dataloader workers; batches are read in order.
     Rows are stacked by default_data_collator (the recipe's LM collator needs a tokenizer; its
     cost is far below a millisecond a step). Neither contender passes an attention mask.
  B. bare: the same init (same seed), torch.optim.AdamW with the same hyperparameters (fused if the
     recipe's optim is adamw_torch_fused; weight decay on matrices only, as Trainer does), a cosine
     LambdaLR, model(input_ids, labels=input_ids).loss, backward, clip_grad_norm_,
     step, zero_grad(set_to_none=True).
Each run takes --warmup_steps untimed steps, then --timed_steps timed ones. A step's time runs from
the end of one optimizer step to the end of the next (for the Trainer, between two on_step_end
callbacks), so it includes fetching the batch but not Trainer start-up. The contenders run
interleaved in --rounds rounds (A then B, then B then A, ...) in one process with the same torch
threads. tokens/s = tokens per step / median step time over all rounds. After every round the two
models' parameters are compared; they agree exactly when both did the same work.
MFU = tokens/s x flops_per_token / peak, where peak is measured here by measure_peak_flops (an fp32
2048^3 matmul on CPU, a bf16 8192^3 one on CUDA), the best of one measurement per round.

Targets: ratio recipe/bare >= 0.95 (the Trainer costs at most 5%); recipe MFU >= 0.6 on CPU, and
>= 0.5 in bf16 on one GPU for the ~350M shape.
Caveat: the figures are only as good as the machine is quiet. Other jobs on the same cores slow
steps and the peak alike and unevenly, which is why the runs interleave, the figures are medians
and the load average is printed; on a busy machine rerun with more --rounds, or when it is idle,
before trusting a difference of a few percent. With other jobs on the cores, 2 OpenMP threads can
stall each other: on a 2-core machine with one busy neighbour, OMP_NUM_THREADS=1 trained this
model 2.5x faster than 2 threads (MFU 0.81 against 0.31, same measured peak).
This is a script that prints figures, not a test.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import statistics
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

from data_prep.artifacts import UserError, parse_config, run_cli
from recipes.pretrain.pretrain import ArchitectureArguments

RATIO_TARGET = 0.95
MFU_TARGETS = {"cpu": 0.6, "cuda": 0.5}  # fp32 on a CPU; bf16 on one GPU (the ~350M preset's shape)


@dataclass
class BenchmarkArguments:
    vocab_size: int = field(default=7680, metadata={"help": "With the default shape: 7.34M parameters."})
    seq_len: int = field(default=256)
    batch_size: int = field(default=8)
    warmup_steps: int = field(default=3, metadata={"help": "Untimed steps at the start of every run (>= 1)."})
    timed_steps: int = field(default=12)
    rounds: int = field(default=3, metadata={"help": "Rounds of A and B, alternating which goes first."})
    recipe_config: str = field(default=str(Path(__file__).with_name("tiny.yaml")),
                               metadata={"help": "Recipe YAML whose training hyperparameters both contenders use."})
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast; CUDA only."})
    torch_compile: bool = field(default=False, metadata={
        "help": "torch.compile both contenders (the recipe through TrainingArguments.torch_compile)."})
    seed: int = field(default=42)
    output_json: str | None = field(default=None)


class _Vocab:
    """Stands in for a tokenizer: the recipe's build_config reads only its length and special ids."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size


def main(bench: BenchmarkArguments, arch: ArchitectureArguments) -> dict:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, TrainerCallback, default_data_collator, set_seed
    from transformers.trainer_callback import PrinterCallback

    from recipes.pretrain.pretrain import ThroughputTrainer, build_config, parse_args
    from recipes.pretrain.throughput import ThroughputMeter, flops_per_token, measure_peak_flops

    if bench.warmup_steps < 1 or bench.timed_steps < 1 or bench.rounds < 1:
        raise UserError("warmup_steps, timed_steps and rounds must all be at least 1")
    for key, least in (("batch_size", 1), ("seq_len", 2), ("vocab_size", 3)):  # 3: the stand-in bos, eos and pad
        if getattr(bench, key) < least:
            raise UserError(f"{key} must be >= {least}, got {getattr(bench, key)}")
    if not 0 <= bench.seed < 2**32:
        raise UserError(f"seed must be in [0, 2**32 - 1], got {bench.seed}")
    if bench.seq_len > arch.max_position_embeddings:
        raise UserError(f"seq_len {bench.seq_len} exceeds max_position_embeddings {arch.max_position_embeddings}")
    if bench.bf16 and not torch.cuda.is_available():
        raise UserError("--bf16 true is the CUDA branch; on CPU the benchmark runs fp32, like the recipe")
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*pin_memory.*")  # the recipe's default; a no-op on CPU
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    total_steps = bench.warmup_steps + bench.timed_steps
    threads = torch.get_num_threads()

    # ------------------------------------------------------------------ recipe arguments
    # Parsed by the recipe's own parser from its YAML; the overrides only turn off what a benchmark must not time.
    out_dir = tempfile.mkdtemp(prefix="pretrain-benchmark-")
    recipe_args, targs, _ = parse_args([
        "--config", bench.recipe_config, "--output_dir", out_dir, "--max_steps", str(total_steps),
        "--per_device_train_batch_size", str(bench.batch_size), "--gradient_accumulation_steps", "1",
        "--bf16", str(bench.bf16), "--fp16", "false", "--seed", str(bench.seed),
        "--torch_compile", str(bench.torch_compile),
        "--logging_strategy", "no", "--save_strategy", "no", "--eval_strategy", "no", "--eval_on_start", "false",
        "--report_to", "none", "--push_to_hub", "false", "--disable_tqdm", "true", "--dataloader_num_workers", "0",
        "--train_sampling_strategy", "sequential"])
    if recipe_args.muon or targs.lr_scheduler_type != "cosine" or targs.optim not in ("adamw_torch", "adamw_torch_fused"):
        raise UserError(f"{bench.recipe_config}: the bare loop mirrors cosine + adamw_torch(_fused) only, "
                        f"got {targs.lr_scheduler_type} + {'muon' if recipe_args.muon else targs.optim}")
    optim = str(getattr(targs.optim, "value", targs.optim))

    # ------------------------------------------------------------------ model and data
    config = build_config(arch, _Vocab(bench.vocab_size))

    def fresh_model():
        set_seed(bench.seed)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)

    probe = fresh_model()
    n_params = sum(p.numel() for p in probe.parameters())
    fpt = flops_per_token(probe, bench.seq_len)
    del probe
    tokens_per_step = bench.batch_size * bench.seq_len
    generator = torch.Generator().manual_seed(bench.seed)
    batches = torch.randint(bench.vocab_size, (total_steps, bench.batch_size, bench.seq_len), generator=generator)
    rows = batches.reshape(-1, bench.seq_len)  # the Trainer reads these rows in order: the same batches

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            return {"input_ids": rows[i], "labels": rows[i]}

    peak_dtype, dtype_name = (torch.bfloat16, "bf16") if bench.bf16 else (torch.float32, "fp32")
    peak_size = 8192 if device.type == "cuda" else 2048  # a 2048^3 matmul is launch-bound on a large GPU

    # ------------------------------------------------------------------ contenders
    class StepTimer(TrainerCallback):
        def __init__(self):
            self.begins, self.ends = [], []

        def on_step_begin(self, args, state, control, **kwargs):
            self.begins.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            self.ends.append(time.perf_counter())

    def run_recipe():
        model, timer = fresh_model(), StepTimer()
        trainer = ThroughputTrainer(model=model, args=targs, train_dataset=Rows(),
                                    data_collator=default_data_collator, callbacks=[timer])
        trainer.remove_callback(PrinterCallback)  # it would print the end-of-train summary, start-up included
        trainer.meter = ThroughputMeter(tokens_per_step, fpt, peaks[-1], 1)  # as the recipe does; idle with logging off
        trainer.add_callback(trainer.meter)
        trainer.train()
        w = bench.warmup_steps  # Trainer time outside forward/backward/step: batch fetch, callbacks, log checks
        recipe_gaps.extend(b - a for a, b in zip(timer.ends[w - 1:-1], timer.begins[w:]))
        return trainer.model, timer.ends

    def run_bare():
        import math

        model = fresh_model().to(device)
        model.train()
        forward = torch.compile(model) if bench.torch_compile else model  # Trainer's default backend and mode
        decay = [p for p in model.parameters() if p.ndim >= 2]  # Trainer: no decay on norms and biases
        no_decay = [p for p in model.parameters() if p.ndim < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": targs.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=targs.learning_rate, betas=(targs.adam_beta1, targs.adam_beta2), eps=targs.adam_epsilon,
            fused=optim == "adamw_torch_fused")
        warmup = targs.get_warmup_steps(total_steps)

        def cosine(step):
            if step < warmup:
                return step / max(1, warmup)
            progress = (step - warmup) / max(1, total_steps - warmup)
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)
        data = batches.to(device)
        ends = []
        for step in range(total_steps):
            input_ids = data[step]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bench.bf16):
                loss = forward(input_ids=input_ids, labels=input_ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), targs.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            sync()
            ends.append(time.perf_counter())
        return model, ends

    # ------------------------------------------------------------------ rounds
    step_times = {"recipe": [], "bare": []}
    round_tps = {"recipe": [], "bare": []}
    peaks, param_diffs, recipe_gaps = [], [], []
    print(f"[benchmark] {config.model_type} {n_params / 1e6:.2f}M params, {fpt / 1e6:.1f} MFLOP/token, "
          f"batch {bench.batch_size} x {bench.seq_len} tokens, {bench.warmup_steps}+{bench.timed_steps} steps "
          f"x {bench.rounds} rounds, {device.type} {dtype_name}{' compiled' if bench.torch_compile else ''}, "
          f"{threads} torch threads, optim {optim}; "
          f"load average {_load()}", flush=True)
    try:
        for r in range(bench.rounds):
            peaks.append(measure_peak_flops(device, peak_dtype, size=peak_size))
            models = {}
            for name in (("recipe", "bare") if r % 2 == 0 else ("bare", "recipe")):
                model, ends = (run_recipe if name == "recipe" else run_bare)()
                if len(ends) != total_steps:
                    raise RuntimeError(f"{name}: timed {len(ends)} steps, expected {total_steps}")
                times = [b - a for a, b in zip(ends[bench.warmup_steps - 1:], ends[bench.warmup_steps:])]
                step_times[name] += times
                round_tps[name].append(tokens_per_step * len(times) / sum(times))
                model = getattr(model, "_orig_mod", model)  # a compiled module prefixes its state_dict keys
                models[name] = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
                del model
                gc.collect()
            recipe_params, bare_params = models["recipe"], models["bare"]
            param_diffs.append(max((recipe_params[k] - bare_params[k]).abs().max().item() for k in bare_params))
            print(f"[benchmark] round {r + 1}: recipe {round_tps['recipe'][-1]:,.0f} tok/s, bare "
                  f"{round_tps['bare'][-1]:,.0f} tok/s, peak {peaks[-1] / 1e12:.3f} TFLOP/s, "
                  f"max |param recipe - bare| {param_diffs[-1]:.1e}", flush=True)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    if torch.get_num_threads() != threads:
        raise RuntimeError(f"torch threads changed during the run: {threads} -> {torch.get_num_threads()}")

    # ------------------------------------------------------------------ report
    peak = max(peaks)
    peak_source = f"measured {dtype_name} {peak_size}^3 matmul on {device.type}, best of {len(peaks)}"
    results = {}
    for name in ("recipe", "bare"):
        median_step = statistics.median(step_times[name])
        tps = tokens_per_step / median_step
        results[name] = {"tokens_per_second": round(tps, 1), "median_step_ms": round(1e3 * median_step, 2),
                         "mfu": round(tps * fpt / peak, 4),
                         "round_tokens_per_second": [round(x, 1) for x in round_tps[name]],
                         "step_times_s": [round(x, 4) for x in step_times[name]]}
    ratio = results["recipe"]["tokens_per_second"] / results["bare"]["tokens_per_second"]
    print(f"\npeak = {peak / 1e12:.3f} TFLOP/s ({peak_source}; a measured peak, not a data-sheet one)")
    print(f"{'contender':<18}{'tokens/s':>10}{'step ms':>10}{'MFU':>8}   tokens/s per round")
    for name, label in (("recipe", "recipe (Trainer)"), ("bare", "bare PyTorch")):
        res = results[name]
        per_round = " ".join(f"{x:,.0f}" for x in res["round_tokens_per_second"])
        print(f"{label:<18}{res['tokens_per_second']:>10,.0f}{res['median_step_ms']:>10.1f}{res['mfu']:>8.3f}"
              f"   {per_round}")
    gap_ms = 1e3 * statistics.median(recipe_gaps)
    print(f"Trainer time between steps (batch fetch, callbacks): median {gap_ms:.2f} ms")
    print(f"ratio recipe/bare = {ratio:.3f} (target >= {RATIO_TARGET})")
    print(f"MFU recipe = {results['recipe']['mfu']:.3f} (target >= {MFU_TARGETS[device.type]}); "
          f"MFU bare = {results['bare']['mfu']:.3f}")
    tolerance = 1e-2 if bench.bf16 else 1e-4  # GPU bf16 kernels are not bitwise reproducible
    print(f"max |param recipe - bare| after {total_steps} steps = {max(param_diffs):.1e} (same init, data and updates)"
          + ("" if max(param_diffs) < tolerance else "  WARNING: the contenders did not do the same work"))
    print(f"load average now {_load()} on {os.cpu_count()} cores (other jobs make every figure noisy)")

    report = {
        "model": {"params": n_params, "flops_per_token": fpt, "architecture": asdict(arch)},
        "benchmark": asdict(bench), "device": device.type, "dtype": dtype_name, "torch_threads": threads,
        "optim": optim, "load_average_after": os.getloadavg(), "tokens_per_step": tokens_per_step,
        "peak_tflops": round(peak / 1e12, 4), "peak_source": peak_source,
        "peak_tflops_per_round": [round(p / 1e12, 4) for p in peaks],
        **results, "ratio_recipe_over_bare": round(ratio, 4), "ratio_target": RATIO_TARGET,
        "mfu_target": MFU_TARGETS[device.type],
        "max_param_diff": max(param_diffs), "recipe_between_steps_ms": round(gap_ms, 3),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    if bench.output_json:
        path = Path(bench.output_json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"results written to {path}")
    return report


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


if __name__ == "__main__":
    run_cli(lambda: main(*parse_config([BenchmarkArguments, ArchitectureArguments])))

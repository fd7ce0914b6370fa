"""The SFT recipe: assistant-only labels, full and PEFT runs, adapter reload, LoRA merge, bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from conftest import REPO_ROOT, pushed_when_finished, run_interrupted_and_resumed
from data_prep.artifacts import UserError
from recipes.sft import sft

THREE_TURNS = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "Sort these numbers: 3 1 2"},
    {"role": "assistant", "content": "1 2 3"},
    {"role": "user", "content": "Now reverse it."},
    {"role": "assistant", "content": "3 2 1"},
]


def sft_argv(tiny_pretrained, chat_data, output_dir, config="tiny.yaml", *extra):
    return ["--config", str(REPO_ROOT / "recipes/sft" / config), "--model_name_or_path", str(tiny_pretrained),
            "--dataset_path", str(chat_data), "--output_dir", str(output_dir), "--max_steps", "3",
            "--per_device_train_batch_size", "4", "--logging_steps", "1", "--eval_max_samples", "8",
            "--eval_max_new_tokens", "8", "--disable_tqdm", "true", *extra]


def expected_assistant_mask(tokenizer, messages) -> list[bool]:
    """Which token ids must carry loss, worked out independently of TRL: render the conversation
    turn by turn and mark the tokens of each assistant reply plus its `<|end|>`."""
    ids: list[int] = []
    mask: list[bool] = []
    for i, message in enumerate(messages):
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False) if i else ""
        if message["role"] == "assistant":
            header = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            reply = message["content"] + "<|end|>"
            pieces = [(header[len(before):], False), (reply, True), ("\n", False)]
        else:
            after = tokenizer.apply_chat_template(messages[:i + 1], tokenize=False)
            pieces = [(after[len(before):], False)]
        for text, trained in pieces:
            new = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += new
            mask += [trained] * len(new)
    return ids, mask


def test_labels_are_masked_on_every_system_and_user_token_of_three_turns(tiny_pretrained, tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_pretrained)
    model = AutoModelForCausalLM.from_pretrained(tiny_pretrained)
    args = SFTConfig(output_dir=str(tmp_path), assistant_only_loss=True, eos_token="<|end|>", max_length=256,
                     report_to="none", use_cpu=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list([{"messages": THREE_TURNS}]),
                         processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[0]])
    input_ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()

    ids, mask = expected_assistant_mask(tokenizer, THREE_TURNS)
    assert input_ids == ids  # the same rendering, token for token
    for token, label, trained in zip(input_ids, labels, mask):
        assert label == (token if trained else -100)
    # every assistant reply is trained in all three turns, not only the last
    trained_text = tokenizer.decode([t for t, m in zip(ids, mask) if m])
    assert trained_text == "5<|end|>1 2 3<|end|>3 2 1<|end|>"
    prompt_text = tokenizer.decode([t for t, m in zip(ids, mask) if not m])
    for message in THREE_TURNS:
        if message["role"] != "assistant":
            assert message["content"] in prompt_text


def run_sft(argv, callbacks=None):
    return sft.main(*sft.parse_args(argv), callbacks=callbacks)


def logits_of(model, tokenizer):
    text = tokenizer.apply_chat_template(THREE_TURNS, tokenize=False)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(model.device)
    with torch.inference_mode():
        return model(**ids).logits


class CaptureModel(TrainerCallback):
    """Keeps the trained model (a PeftModel for adapters) for inspection after the run."""

    model = None

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.model = model


def test_full_sft_runs_and_saves_a_reloadable_chat_model(tiny_pretrained, tiny_chat_data, tmp_path):
    out = tmp_path / "full"
    metrics = run_sft(sft_argv(tiny_pretrained, tiny_chat_data["sft"], out))
    assert math.isfinite(metrics["train_loss"]) and metrics["steps"] == 3
    assert metrics["trainable_params"] == metrics["total_params"]
    assert 0 <= metrics["exact_match_after"]["exact_match"] <= 1 and metrics["exact_match_after"]["n"] == 8
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "sft" and manifest["inputs"]["model"] == str(tiny_pretrained)
    assert manifest["inputs"]["model_fingerprint"] == json.loads((tiny_pretrained / "manifest.json").read_text())["fingerprint"]
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.eos_token == "<|end|>"  # generation stops at the end of the assistant turn
    model = AutoModelForCausalLM.from_pretrained(out)
    assert (out / "model.safetensors").is_file()
    assert torch.isfinite(logits_of(model, tokenizer)).all()
    # full fine-tuning moved the weights of every layer away from the pretrained ones it started from
    from safetensors.torch import load_file

    saved, pretrained = load_file(out / "model.safetensors"), load_file(tiny_pretrained / "model.safetensors")
    assert saved.keys() == pretrained.keys()
    changed = {k for k in saved if not torch.equal(saved[k], pretrained[k])}
    for i in range(model.config.num_hidden_layers):
        assert {f"model.layers.{i}.self_attn.q_proj.weight", f"model.layers.{i}.mlp.down_proj.weight"} <= changed, i
    assert "model.embed_tokens.weight" in changed


def test_push_to_hub_uploads_the_finished_output_dir(fake_hub, tiny_pretrained, tiny_chat_data, tmp_path):
    out = tmp_path / "pushed"
    run_sft(sft_argv(tiny_pretrained, tiny_chat_data["sft"], out, "tiny.yaml", "--push_to_hub", "true",
                     "--hub_model_id", "me/sft-tiny", "--eval_exact_match", "false"))
    pushed_when_finished(fake_hub, out, "me/sft-tiny", "Chat model fine-tuned with SFT")


def test_failed_upload_is_one_line_and_leaves_the_run_complete(fake_hub, tiny_pretrained, tiny_chat_data, tmp_path):
    def refuse(self, **kwargs):
        raise OSError("401 Client Error: Unauthorized for url: https://huggingface.co/api/repos/me/sft-tiny\nmore")

    fake_hub.upload_folder = refuse
    out = tmp_path / "pushed"
    with pytest.raises(UserError, match=r"^push_to_hub: .*pushed is complete, but the upload to me/sft-tiny failed "
                                        r"\(OSError: 401 Client Error: .*\); upload it with `hf upload me/sft-tiny "):
        run_sft(sft_argv(tiny_pretrained, tiny_chat_data["sft"], out, "tiny.yaml", "--push_to_hub", "true",
                         "--hub_model_id", "me/sft-tiny", "--eval_exact_match", "false"))
    assert (out / "manifest.json").is_file()  # the local run finished and stays usable


@pytest.mark.parametrize("saved_count", [True, False], ids=["num_tokens_saved", "checkpoint_from_elsewhere"])
def test_resume_after_interruption_matches_the_uninterrupted_run(saved_count, tiny_pretrained, tiny_chat_data,
                                                                  tmp_path):
    """SFTTrainer restores the optimizer, schedule, random states and data position; the recipe passes
    resume_from_checkpoint on, records it in the manifest and carries the trained-token count over (from the
    checkpoint, or else from its log)."""
    from recipes.common import TOKEN_COUNT_NAME

    def argv(out, *extra):
        return sft_argv(tiny_pretrained, tiny_chat_data["sft"], out, "tiny.yaml", "--max_steps", "4",
                        "--save_strategy", "steps", "--save_steps", "2", *extra)

    dropped = () if saved_count else (TOKEN_COUNT_NAME,)
    run_interrupted_and_resumed(run_sft, argv, tmp_path, drop_from_checkpoint=dropped)


@pytest.mark.parametrize("config", ["tiny_lora.yaml", "tiny_bottleneck.yaml"])
def test_peft_trains_few_parameters_leaves_base_unchanged_and_reloads_identically(config, tiny_pretrained,
                                                                                   tiny_chat_data, tmp_path):
    from peft import PeftModel

    import recipes.bottleneck_adapter  # noqa: F401  (registers BOTTLENECK for PeftModel.from_pretrained)

    out = tmp_path / config
    captured = CaptureModel()
    metrics = run_sft(sft_argv(tiny_pretrained, tiny_chat_data["sft"], out, config, "--merge_adapter", "false",
                               "--lora_r", "4", "--bottleneck_size", "4", "--learning_rate", "0.05"),
                      callbacks=[captured])
    assert metrics["trainable_params"] < metrics["total_params"]
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    # LoRA's B and the adapters' up-projection start at exactly 0: all of them have learned something
    from safetensors.torch import load_file

    zero_init = {k: v for k, v in load_file(out / "adapter_model.safetensors").items()
                 if "lora_B" in k or "bottleneck_up" in k and k.endswith("weight")}
    assert zero_init and all(torch.count_nonzero(v) > 0 for v in zero_init.values()), sorted(zero_init)

    # after training, the frozen base inside the trained model is what was pretrained, bit for bit
    pretrained = AutoModelForCausalLM.from_pretrained(tiny_pretrained).state_dict()
    compared = 0
    for name, tensor in captured.model.get_base_model().state_dict().items():
        key = name.replace("base_layer.", "").replace("token_adapter.", "")
        if key in pretrained:
            assert torch.equal(tensor, pretrained[key]), name
            compared += 1
    assert compared == len(pretrained)

    tokenizer = AutoTokenizer.from_pretrained(out)
    adapted = captured.model.eval()
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_pretrained), out)
    assert torch.equal(logits_of(adapted, tokenizer), logits_of(reloaded, tokenizer))
    with adapted.disable_adapter():
        assert not torch.equal(logits_of(adapted, tokenizer), logits_of(reloaded, tokenizer))


def test_peft_share_of_trainable_parameters_on_the_tiny_preset():
    """The issue's bound (< 5%) on the model users fine-tune: the architecture of recipes/pretrain/tiny.yaml
    (built by the pretraining recipe's own build_config) with the speedrun's tokenizer size (train_tokenizer's
    default, 512), and LoRA and adapters exactly as tiny_lora.yaml / tiny_bottleneck.yaml configure them."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from data_prep.train_tokenizer import TokenizerArguments
    from recipes.peft_methods import build_peft_config, trainable_parameters
    from recipes.pretrain import pretrain

    class SpeedrunTokenizer:
        bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

        def __len__(self):
            return TokenizerArguments().vocab_size

    _, _, arch_args = pretrain.parse_args(["--config", str(REPO_ROOT / "recipes/pretrain/tiny.yaml")])
    config = pretrain.build_config(arch_args, SpeedrunTokenizer())
    assert (config.vocab_size, config.num_hidden_layers, config.hidden_size) == (512, 4, 128)
    d, d_ff, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    base = AutoModelForCausalLM.from_config(config)
    n_base = sum(p.numel() for p in base.parameters())
    assert n_base == 918_656  # the "0.92M parameters" tiny.yaml states
    shares = {}
    for yaml_name in ("tiny_lora.yaml", "tiny_bottleneck.yaml"):
        _, _, model_args, peft_args = sft.parse_args(["--config", str(REPO_ROOT / "recipes/sft" / yaml_name)])
        model = get_peft_model(AutoModelForCausalLM.from_config(config), build_peft_config(model_args, peft_args))
        trainable, total = trainable_parameters(model)
        if yaml_name == "tiny_lora.yaml":  # r (d_in + d_out) on the 4 attention and 3 MLP projections of each layer
            r = model_args.lora_r
            expected = layers * r * (4 * (d + d) + 2 * (d + d_ff) + (d_ff + d))
        else:  # down (d x b + b), up (b x d + d) after attention and after the MLP of each layer
            b = peft_args.bottleneck_size
            expected = layers * 2 * (d * b + b + b * d + d)
        assert (trainable, total) == (expected, n_base + expected), yaml_name
        shares[yaml_name] = trainable / total
    # LoRA r=4 trains 4.3% and the bottleneck adapters (size 16) 3.6% of this model: both under 5%
    assert shares == {"tiny_lora.yaml": pytest.approx(0.0427, abs=5e-4),
                      "tiny_bottleneck.yaml": pytest.approx(0.0356, abs=5e-4)}


def test_merged_lora_gives_the_adapter_models_logits(tiny_pretrained, tiny_chat_data, tmp_path):
    from peft import PeftModel

    out = tmp_path / "merged"
    run_sft(sft_argv(tiny_pretrained, tiny_chat_data["sft"], out, "tiny_lora.yaml", "--merge_adapter", "true",
                     "--learning_rate", "0.05", "--eval_exact_match", "false"))
    tokenizer = AutoTokenizer.from_pretrained(out)
    merged = AutoModelForCausalLM.from_pretrained(out)  # a standalone model: no adapter files at the top level
    assert not (out / "adapter_config.json").exists() and (out / "adapter" / "adapter_config.json").is_file()
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_pretrained), out / "adapter")
    base = AutoModelForCausalLM.from_pretrained(tiny_pretrained)
    merged_logits, adapter_logits = logits_of(merged, tokenizer), logits_of(adapter, tokenizer)
    assert (merged_logits - adapter_logits).abs().max() < 1e-5
    assert (merged_logits - logits_of(base, tokenizer)).abs().max() > 1e-3  # the adapter did change the model


def test_other_peft_methods_are_reachable_by_config(tiny_pretrained, tiny_chat_data, tmp_path):
    for method, peft_type, extra in (("ia3", "IA3", ["--lora_target_modules", "k_proj", "v_proj", "down_proj"]),
                                     ("prompt_tuning", "PROMPT_TUNING", ["--num_virtual_tokens", "4"])):
        metrics = run_sft(sft_argv(tiny_pretrained, tiny_chat_data["sft"], tmp_path / method, "tiny_bottleneck.yaml",
                                   "--peft_method", method, "--max_steps", "2",
                                   "--eval_max_samples", "4", *extra))
        assert 0 < metrics["trainable_params"] < metrics["total_params"] and math.isfinite(metrics["train_loss"])
        assert json.loads((tmp_path / method / "adapter_config.json").read_text())["peft_type"] == peft_type
    # prefix tuning fails inside the pinned TRL: refused up front with the reason
    with pytest.raises(UserError, match="prefix_tuning does not work in the sft recipe: .*fused LM head"):
        run_sft(sft_argv(tiny_pretrained, tiny_chat_data["sft"], tmp_path / "prefix", "tiny_bottleneck.yaml",
                         "--peft_method", "prefix_tuning"))


def test_qlora_without_cuda_stops_with_one_line(tiny_pretrained, tiny_chat_data, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: QLoRA would run")
    with pytest.raises(UserError, match="load_in_4bit.*CUDA"):
        run_sft(sft_argv(tiny_pretrained, tiny_chat_data["sft"], tmp_path / "q", "tiny_lora.yaml",
                         "--load_in_4bit", "true"))


def write_rows(tmp_path, rows):
    """A one-split chat dataset with a manifest, as data_prep writes it, holding `rows`."""
    from datasets import Dataset, DatasetDict

    from data_prep.artifacts import build_manifest, write_manifest

    path = tmp_path / "bad_data"
    DatasetDict({"train": Dataset.from_list(rows), "test": Dataset.from_list(rows)}).save_to_disk(str(path))
    write_manifest(path, build_manifest("sft_data", {}, {}, {}))
    return path


GOOD = {"task": "arithmetic", "answer": "5", "safety_label": ""}


@pytest.mark.parametrize("messages,needle", [
    ([{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "5"}], "role"),
    ([{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": " "}], "empty"),
    ([{"role": "user", "content": "What is 2 + 3?"}], "assistant"),
])
def test_bad_conversations_stop_with_one_line_naming_row_and_field(messages, needle, tiny_pretrained, tmp_path):
    path = write_rows(tmp_path, [{"messages": [{"role": "user", "content": "2 + 3?"}, {"role": "assistant", "content": "5"}],
                                  **GOOD}, {"messages": messages, **GOOD}])
    with pytest.raises(UserError) as err:
        run_sft(sft_argv(tiny_pretrained, path, tmp_path / "out"))
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "row 1" in message and needle in message


def test_missing_messages_column_and_bad_targets_and_missing_markers(tiny_pretrained, tiny_chat_data, tmp_path):
    path = write_rows(tmp_path, [{"text": "no messages here"}])
    with pytest.raises(UserError, match="messages"):
        run_sft(sft_argv(tiny_pretrained, path, tmp_path / "a"))
    with pytest.raises(UserError, match="lora_target_modules: c_attn not found"):
        run_sft(sft_argv(tiny_pretrained, tiny_chat_data["sft"], tmp_path / "b", "tiny_lora.yaml",
                         "--lora_target_modules", "q_proj", "c_attn"))
    template = tmp_path / "plain.jinja"  # a chat template without {% generation %}
    template.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    with pytest.raises(UserError, match="generation"):
        run_sft(sft_argv(tiny_pretrained, tiny_chat_data["sft"], tmp_path / "c", "tiny.yaml",
                         "--chat_template_path", str(template)))
    for out in ("a", "b", "c"):
        assert not (tmp_path / out / "manifest.json").exists()


@pytest.mark.parametrize("key", ["eos_token", "pad_token"])
def test_special_token_missing_from_the_vocabulary_is_one_line(key, tiny_pretrained, tiny_chat_data, tmp_path):
    with pytest.raises(UserError) as err:
        run_sft(sft_argv(tiny_pretrained, tiny_chat_data["sft"], tmp_path / "out", "tiny.yaml", f"--{key}", "<|nope|>"))
    assert str(err.value) == f"{key}: '<|nope|>' is not in the vocabulary of the tokenizer of {tiny_pretrained}"
    assert not (tmp_path / "out").exists()  # refused before the trainer is built


def test_fused_head_on_labelled_positions_gives_the_same_loss_and_gradients():
    """recipes.common.fused_head_on_labelled_positions_only changes which rows TRL's fused LM head projects on
    a CPU, not the result: loss, gradients, entropy and top-1 hits match the full projection and a plain
    cross-entropy over the labelled positions."""
    import trl.trainer.utils as trl_utils
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from recipes.common import fused_head_on_labelled_positions_only

    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)
    torch.manual_seed(0)
    input_ids = torch.randint(1, 300, (3, 20))
    labels = input_ids.clone()
    labels[:, :12] = -100  # prompt
    labels[2, 16:] = -100  # padding of a shorter row

    def run():
        torch.manual_seed(1)
        model = LlamaForCausalLM(config)
        add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
        out = model(input_ids=input_ids, labels=labels, fused_lm_head=True)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        return out, grads, model

    original = trl_utils._use_triton
    try:
        trl_utils._use_triton = lambda device: False  # TRL's own choice on a CPU: every position
        full, full_grads, model = run()
        assert fused_head_on_labelled_positions_only()
        assert trl_utils._use_triton(torch.device("cpu"))
        compact, compact_grads, _ = run()
    finally:
        trl_utils._use_triton = original

    with torch.no_grad():  # the reference: ordinary logits and cross-entropy over the labelled positions
        logits = LlamaForCausalLM.forward(model, input_ids=input_ids).logits[:, :-1]
        reference = torch.nn.functional.cross_entropy(logits.reshape(-1, 300), labels[:, 1:].reshape(-1))
    assert torch.allclose(compact.loss, full.loss, atol=1e-6) and torch.allclose(compact.loss, reference, atol=1e-5)
    mask = labels[:, 1:] != -100
    for field in ("log_probs", "entropy"):
        assert torch.allclose(getattr(compact, field)[mask], getattr(full, field)[mask], atol=1e-5), field
        assert (getattr(compact, field)[~mask] == 0).all(), field
    assert torch.equal(compact.is_top1[mask], full.is_top1[mask])
    for name, grad in full_grads.items():
        assert torch.allclose(compact_grads[name], grad, atol=1e-6), name


def test_a_run_replaces_the_previous_runs_final_files_and_keeps_its_checkpoints(tiny_pretrained, tiny_chat_data,
                                                                                tmp_path):
    """A full SFT run over a finished LoRA run's output_dir: the stale adapter files must go, or loading the
    directory would pick the old adapter instead of the new model."""
    from recipes.common import load_pretrained

    out = tmp_path / "sft"
    run_sft(sft_argv(tiny_pretrained, tiny_chat_data["sft"], out, "tiny_lora.yaml", "--merge_adapter", "false",
                     "--eval_exact_match", "false", "--save_strategy", "steps", "--save_steps", "3"))
    assert (out / "adapter_model.safetensors").is_file() and (out / "checkpoint-3").is_dir()
    (out / ".final-tmp").mkdir()  # as a crashed run would leave it, with a stale file in it
    (out / ".final-tmp" / "adapter_config.json").write_text("{}")
    with pytest.raises(UserError, match="^resume_from_checkpoint: directory not found: "):
        run_sft(sft_argv(tiny_pretrained, tiny_chat_data["sft"], out, "tiny.yaml", "--resume_from_checkpoint",
                         str(out / "checkpoint-9")))
    assert (out / "manifest.json").is_file()  # a refused resume leaves the finished run as it was
    run_sft(sft_argv(tiny_pretrained, tiny_chat_data["sft"], out, "tiny.yaml", "--eval_exact_match", "false"))
    names = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" in names and "checkpoint-3" in names and "manifest.json" in names
    assert not [n for n in names if n.startswith("adapter") or n.startswith(".")], names
    model, _, manifest = load_pretrained(str(out), AutoModelForCausalLM)
    assert type(model).__name__ == "LlamaForCausalLM" and manifest["options"].get("use_peft") in (False, None)


def test_an_adapter_output_starts_a_run_merged_into_its_base(tiny_pretrained, tmp_path):
    """An SFT LoRA output (saved without merge_adapter) given as the next run's model: PEFT loaded it frozen, so
    SFT trained 0 parameters, and as a reward model's start its causal-LM wrapper crashed on the classifier.
    It is merged into its base instead; an adapter that cannot be merged is refused in one line."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from recipes.bottleneck_adapter import BottleneckConfig
    from recipes.common import load_pretrained

    tokenizer = AutoTokenizer.from_pretrained(tiny_pretrained)
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_pretrained),
                          LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"]))
    for name, param in lora.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)  # a trained adapter: B is no longer 0
    lora.save_pretrained(tmp_path / "lora")
    tokenizer.save_pretrained(tmp_path / "lora")

    model, _, _ = load_pretrained(str(tmp_path / "lora"), AutoModelForCausalLM, for_training=True)
    assert not isinstance(model, PeftModel) and all(p.requires_grad for p in model.parameters())
    assert model.config._name_or_path == str(tmp_path / "lora")  # TRL's DPO/GRPO reference: the policy, not the base
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_pretrained), tmp_path / "lora")
    assert torch.allclose(logits_of(model, tokenizer), logits_of(adapted.eval(), tokenizer), atol=1e-5)
    judge_start, _, _ = load_pretrained(str(tmp_path / "lora"), AutoModelForSequenceClassification, num_labels=1)
    merged = adapted.merge_and_unload().state_dict()
    backbone = {k: v for k, v in judge_start.state_dict().items() if not k.startswith("score")}
    assert backbone and all(torch.equal(v, merged[k]) for k, v in backbone.items())

    bottleneck = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_pretrained),
                                BottleneckConfig(task_type="CAUSAL_LM", bottleneck_size=4))
    bottleneck.save_pretrained(tmp_path / "bottleneck")
    tokenizer.save_pretrained(tmp_path / "bottleneck")
    with pytest.raises(UserError, match=f"^{tmp_path / 'bottleneck'}: a BOTTLENECK adapter cannot be merged into its "
                                        "base to start a training run; start from its base model"):
        load_pretrained(str(tmp_path / "bottleneck"), AutoModelForCausalLM, for_training=True)


def test_the_model_revision_reaches_the_tokenizer_too(tiny_pretrained, monkeypatch):
    """A pinned `model_revision` loaded the weights of that commit and the tokenizer of the default branch."""
    import transformers

    from recipes.common import load_pretrained

    seen = {}
    load_tokenizer = transformers.AutoTokenizer.from_pretrained

    def recording(path, **kwargs):
        seen.update(kwargs)
        return load_tokenizer(path, **{k: v for k, v in kwargs.items() if k != "revision"})

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", recording)
    load_pretrained(str(tiny_pretrained), AutoModelForCausalLM, revision="0123abc")
    assert seen["revision"] == "0123abc"

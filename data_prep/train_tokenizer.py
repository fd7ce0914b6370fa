"""Train a tokenizer on a corpus built by `data_prep.build_corpus`.

    python -m data_prep.train_tokenizer --corpus_dir outputs/corpus --output_dir outputs/tokenizer --vocab_size 512
    python -m data_prep.train_tokenizer --corpus_dir outputs/corpus --output_dir outputs/tokenizer_spm \
        --kind sentencepiece --spm_model_type unigram --vocab_size 8000

Two kinds:
- `byte_level_bpe` (default) with `tokenizers`: GPT-2's pre-tokenization regex over bytes, which
  llama.cpp implements as the `gpt-2` pre-tokenizer, so the model can be exported to GGUF later.
  Any UTF-8 text (Chinese, emoji, code) round-trips exactly, with no unknown token.
- `sentencepiece` (unigram or BPE) trained with the `sentencepiece` library, byte fallback on,
  no normalisation and no dummy prefix so it round-trips too, converted to a fast tokenizer.

Both save with `save_pretrained` (so `AutoTokenizer.from_pretrained(dir)` loads them) together
with bos/eos/pad, chat role markers and a chat template whose assistant turns are wrapped in
`{% generation %}` so TRL's `assistant_only_loss` can mask everything else. The manifest reports
compression as UTF-8 bytes per token on the validation split. Sizes: 512 (the default) for the
tiny preset, whose model is too small to spend its parameters on a larger embedding (recipes/pretrain/README.md,
"Sizing the tiny preset"); 32k-64k for the real presets (minutes on a few GB).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from data_prep.artifacts import (
    UserError,
    atomic_output_dir,
    build_manifest,
    claim_output_dir,
    load_saved_dataset,
    parse_config,
    read_manifest,
    refuse_unread_options,
    run_cli,
    write_manifest,
)

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
END_OF_TURN = "<|end|>"
ROLE_MARKERS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
SPECIAL_TOKENS = [PAD, BOS, EOS, END_OF_TURN, *ROLE_MARKERS.values()]
BYTE_ALPHABET = 256

# Every turn is `<|role|>\n content <|end|>\n`; only assistant content and its <|end|> are
# inside {% generation %}, so they alone carry loss under assistant_only_loss.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' }}{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% elif message['role'] in ['system', 'user'] %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% else %}{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


@dataclass
class TokenizerArguments:
    corpus_dir: str = field(default="outputs/corpus", metadata={"help": "Output of data_prep.build_corpus."})
    output_dir: str = field(default="outputs/tokenizer")
    kind: str = field(default="byte_level_bpe", metadata={"help": "byte_level_bpe or sentencepiece."})
    spm_model_type: str = field(default="unigram", metadata={"help": "unigram or bpe (kind=sentencepiece)."})
    vocab_size: int = field(default=512)
    min_frequency: int | None = field(default=None, metadata={
        "help": "byte_level_bpe: learn only merges seen this often (default 2). SentencePiece has no such option."})
    model_max_length: int = field(default=2048)
    max_training_docs: int | None = field(default=None, metadata={"help": "Train on at most this many documents."})
    overwrite: bool = field(default=True)


def train_byte_level_bpe(texts, vocab_size: int, min_frequency: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    # use_regex=True is GPT-2's split pattern: llama.cpp's `gpt-2` pre-tokenizer does the same.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def train_sentencepiece(texts, vocab_size: int, model_type: str, workdir: Path):
    import sentencepiece as spm
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers.tokenization_utils_base import generate_merges

    if model_type not in ("unigram", "bpe"):
        raise UserError(f"spm_model_type must be unigram or bpe, got '{model_type}'")
    prefix = workdir / "spm"
    # SentencePiece reads line-sized "sentences"; newlines are restored by byte fallback.
    lines = (line for text in texts for line in text.split("\n") if line.strip())
    try:
        _train_spm_model(spm, lines, prefix, model_type, vocab_size - len(SPECIAL_TOKENS))
    except RuntimeError as err:  # sentencepiece reports corpus/vocab mismatches this way
        raise UserError(f"sentencepiece cannot train vocab_size {vocab_size} on this corpus: "
                        f"{str(err).strip().splitlines()[-1]}") from None
    processor = spm.SentencePieceProcessor(model_file=str(prefix) + ".model")
    pieces = [(processor.id_to_piece(i), processor.get_score(i)) for i in range(processor.get_piece_size())]
    if model_type == "unigram":
        model = models.Unigram(pieces, unk_id=processor.unk_id(), byte_fallback=True)
    else:
        vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
        merges = generate_merges(vocab, dict(pieces))
        model = models.BPE(vocab, merges, unk_token=processor.id_to_piece(processor.unk_id()), byte_fallback=True, fuse_unk=True)
    tokenizer = Tokenizer(model)
    # Newlines stand alone: otherwise a newline glued to out-of-vocabulary characters becomes one
    # byte-fallback span, and a template "\n" would share offsets with (and the loss mask of) the reply.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split("\n", behavior="isolated"),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=False),  # keep "▁▁▁▁" pieces
    ])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    return tokenizer


def _train_spm_model(spm, lines, prefix: Path, model_type: str, vocab_size: int) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines,
        model_prefix=str(prefix),
        model_type=model_type,
        vocab_size=vocab_size,
        byte_fallback=True,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        character_coverage=0.9995,
        unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,
        max_sentence_length=16384,
        input_sentence_size=2_000_000,
        shuffle_input_sentence=True,
        minloglevel=2,
    )


def wrap_for_transformers(tokenizer, model_max_length: int):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[END_OF_TURN, *ROLE_MARKERS.values()],
        chat_template=CHAT_TEMPLATE,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,  # exact round trips: never rewrite " ." into "."
        padding_side="right",
    )


def bytes_per_token(tokenizer, texts: list[str]) -> float:
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_tokens = sum(len(enc.ids) for enc in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False))
    return n_bytes / max(n_tokens, 1)


def load_tokenizer(path: str | Path):
    """Load a tokenizer directory written by this script, with a one-line error if it is missing."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / "tokenizer_config.json").is_file():
        raise UserError(f"tokenizer directory not found or incomplete: {path} (run data_prep.train_tokenizer first)")
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as err:  # a truncated tokenizer.json behind a valid tokenizer_config.json
        raise UserError(f"{path}: a damaged tokenizer ({str(err).splitlines()[0]})") from None


def train_tokenizer(args: TokenizerArguments) -> dict:
    minimum = len(SPECIAL_TOKENS) + BYTE_ALPHABET
    if args.vocab_size < minimum:
        raise UserError(
            f"vocab_size {args.vocab_size} is smaller than the {len(SPECIAL_TOKENS)} special tokens "
            f"plus the {BYTE_ALPHABET}-byte alphabet ({minimum})"
        )
    refuse_unread_options(args, "kind", {"spm_model_type": ("sentencepiece",)})
    if args.kind == "sentencepiece" and args.min_frequency is not None:
        raise UserError("min_frequency applies to byte_level_bpe only: the SentencePiece trainer has no such option")
    if args.kind == "byte_level_bpe":
        args.min_frequency = 2 if args.min_frequency is None else args.min_frequency
        if args.min_frequency < 1:
            raise UserError(f"min_frequency must be >= 1, got {args.min_frequency}")
    if args.vocab_size >= 2**31:  # the trainers' OverflowError
        raise UserError(f"vocab_size must be below 2**31, got {args.vocab_size}")
    if args.max_training_docs is not None and args.max_training_docs < 1:  # [:0] would train on nothing
        raise UserError(f"max_training_docs must be >= 1 (or unset, for all), got {args.max_training_docs}")
    if args.model_max_length < 2:
        raise UserError(f"model_max_length must be >= 2, got {args.model_max_length}")
    claim_output_dir(args.output_dir, "tokenizer", {"corpus_dir": args.corpus_dir})
    corpus_manifest = read_manifest(args.corpus_dir, "corpus", stage="corpus")
    corpus = load_saved_dataset(args.corpus_dir)
    train_texts = list(corpus["train"]["text"])[: args.max_training_docs]

    with tempfile.TemporaryDirectory() as workdir:
        if args.kind == "byte_level_bpe":
            raw = train_byte_level_bpe(iter(train_texts), args.vocab_size, args.min_frequency)
        elif args.kind == "sentencepiece":
            raw = train_sentencepiece(iter(train_texts), args.vocab_size, args.spm_model_type, Path(workdir))
        else:
            raise UserError(f"unknown tokenizer kind '{args.kind}' (use byte_level_bpe or sentencepiece)")
    tokenizer = wrap_for_transformers(raw, args.model_max_length)

    outputs = {
        "vocab_size": len(tokenizer),
        "bytes_per_token_validation": round(bytes_per_token(tokenizer, list(corpus["validation"]["text"])), 4),
        "special_tokens": SPECIAL_TOKENS,
    }
    options = {k: v for k, v in vars(args).items() if k not in ("output_dir", "overwrite", "corpus_dir")}
    inputs = {"corpus_dir": args.corpus_dir, "corpus_fingerprint": corpus_manifest["fingerprint"]}
    manifest = build_manifest("tokenizer", inputs, options, outputs)
    with atomic_output_dir(args.output_dir, args.overwrite) as tmp:
        tokenizer.save_pretrained(str(tmp))
        write_manifest(tmp, manifest)
    return manifest


def main(argv: list[str] | None = None) -> dict:
    (args,) = parse_config([TokenizerArguments], argv)
    manifest = train_tokenizer(args)
    out = manifest["outputs"]
    short = (f" (vocab_size {args.vocab_size} asked: this corpus has merges for only {out['vocab_size']} tokens; "
             "add text or lower vocab_size)" if out["vocab_size"] < args.vocab_size else "")
    print(f"tokenizer -> {args.output_dir}: {args.kind}, vocab {out['vocab_size']}{short}, "
          f"{out['bytes_per_token_validation']:.2f} bytes/token on validation")
    return manifest


if __name__ == "__main__":
    run_cli(main)

"""Tokenize a corpus and pack it into fixed-length blocks for pretraining.

    python -m data_prep.pack_dataset --corpus_dir outputs/corpus --tokenizer_dir outputs/tokenizer \
        --output_dir outputs/packed --block_size 256 --num_proc 2

Each document becomes `<bos> text <eos>`, where text that spells a special token (`<|end_of_text|>` in
a document about tokenizers) is encoded as ordinary text, not as that token; documents are
concatenated and cut into blocks of `block_size` tokens. Packing happens per batch of
`pack_batch_size` documents inside `Dataset.map(num_proc=...)`; the last, shorter block of each
batch is right-padded with the pad token and masked (`attention_mask` 0), so no token is lost or
repeated. With the default batch of 2,000 documents this wastes well under 1% of positions. Sizes:
the embedded default packs to 5.0M train tokens (19,640 blocks of 256, vocab 512) in about 10
seconds on 2 cores; FineWeb-Edu sample-10BT is ~10B tokens and wants all cores for about an hour.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field

from data_prep.artifacts import (
    UserError,
    atomic_output_dir,
    build_manifest,
    claim_output_dir,
    load_saved_dataset,
    parse_config,
    read_manifest,
    run_cli,
    write_manifest,
)
from data_prep.train_tokenizer import load_tokenizer


@dataclass
class PackArguments:
    corpus_dir: str = field(default="outputs/corpus")
    tokenizer_dir: str = field(default="outputs/tokenizer")
    output_dir: str = field(default="outputs/packed")
    block_size: int = field(default=256, metadata={"help": "Tokens per training example."})
    num_proc: int = field(default=2)
    pack_batch_size: int = field(default=2000, metadata={"help": "Documents packed together; one padded tail each."})
    overwrite: bool = field(default=True)


def pack_blocks(token_lists: list[list[int]], block_size: int, pad_id: int) -> dict[str, list[list[int]]]:
    """Concatenate token lists and cut them into `block_size` blocks; pad and mask the tail."""
    stream = [tok for ids in token_lists for tok in ids]
    blocks, masks = [], []
    for start in range(0, len(stream), block_size):
        block = stream[start : start + block_size]
        pad = block_size - len(block)
        blocks.append(block + [pad_id] * pad)
        masks.append([1] * len(block) + [0] * pad)
    return {"input_ids": blocks, "attention_mask": masks}


def pack_dataset(args: PackArguments) -> dict:
    import pyarrow.compute as pc
    from datasets import DatasetDict

    if args.block_size < 2:
        raise UserError(f"block_size must be at least 2, got {args.block_size}")
    if args.pack_batch_size < 1:  # datasets would read 0 or less as "the whole split in one batch"
        raise UserError(f"pack_batch_size must be >= 1, got {args.pack_batch_size}")
    if args.num_proc < 1:
        raise UserError(f"num_proc must be >= 1, got {args.num_proc}")
    claim_output_dir(args.output_dir, "packed", {"corpus_dir": args.corpus_dir, "tokenizer_dir": args.tokenizer_dir})
    corpus_manifest = read_manifest(args.corpus_dir, "corpus", stage="corpus")
    tokenizer_manifest = read_manifest(args.tokenizer_dir, "tokenizer", stage="tokenizer")
    tokenizer = load_tokenizer(args.tokenizer_dir)
    backend = tokenizer.backend_tokenizer
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id

    def tokenize_and_pack(batch):
        # the text "<|end_of_text|>" in a document (code, a web page about tokenizers) stays text: as the
        # special token it would end the document early. Set here, as num_proc workers get an unpickled copy
        # of the tokenizer, which forgets it.
        backend.encode_special_tokens = True
        encoded = backend.encode_batch(batch["text"], add_special_tokens=False)
        return pack_blocks([[bos, *enc.ids, eos] for enc in encoded], args.block_size, pad)

    corpus = load_saved_dataset(args.corpus_dir)
    with atomic_output_dir(args.output_dir, args.overwrite) as tmp:
        # map's cache goes into the new output, not next to the corpus: a stage never writes into its inputs
        cache = tmp / "_map_cache"
        cache.mkdir()
        packed = DatasetDict(
            {
                split: ds.map(
                    tokenize_and_pack,
                    batched=True,
                    batch_size=args.pack_batch_size,
                    remove_columns=ds.column_names,
                    num_proc=args.num_proc if len(ds) >= 2 * args.num_proc else None,
                    cache_file_name=str(cache / f"{split}.arrow"),
                    desc=f"pack {split}",
                )
                for split, ds in corpus.items()
            }
        )
        outputs = {}
        for split, ds in packed.items():
            # counted in Arrow: a Python loop over every mask would not survive a 10B-token corpus
            real = pc.sum(pc.list_flatten(ds.data.column("attention_mask"))).as_py() or 0
            outputs[split] = {"blocks": len(ds), "tokens": real, "padding": len(ds) * args.block_size - real}
        outputs["block_size"] = args.block_size
        inputs = {
            "corpus_dir": args.corpus_dir,
            "corpus_fingerprint": corpus_manifest["fingerprint"],
            "tokenizer_dir": args.tokenizer_dir,
            "tokenizer_fingerprint": tokenizer_manifest["fingerprint"],
        }
        options = {"block_size": args.block_size, "pack_batch_size": args.pack_batch_size, "bos": bos, "eos": eos,
                   "pad": pad, "special_token_text": "encoded as text"}
        manifest = build_manifest("packed", inputs, options, outputs)
        packed.save_to_disk(str(tmp))
        shutil.rmtree(cache)
        write_manifest(tmp, manifest)
    return manifest


def main(argv: list[str] | None = None) -> dict:
    (args,) = parse_config([PackArguments], argv)
    manifest = pack_dataset(args)
    out = manifest["outputs"]
    print(f"packed -> {args.output_dir}: train {out['train']['blocks']} blocks / {out['train']['tokens']:,} tokens, "
          f"validation {out['validation']['blocks']} blocks / {out['validation']['tokens']:,} tokens (block {args.block_size})")
    return manifest


if __name__ == "__main__":
    run_cli(main)

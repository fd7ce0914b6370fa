"""Corpus BLEU from sacrebleu, as a local `evaluate` module (no Hub download).

    import evaluate
    bleu = evaluate.load("recipes/eval/metrics/bleu")
    bleu.compute(predictions=["the cat sat"], references=[["the cat sat down"]])

Each prediction has one reference string or a list of references (the same number for every
prediction). The score is sacrebleu's `corpus_bleu` on its usual 0-100 scale, with the options
passed through; `signature` names them so that scores from different settings are never mixed up.
"""

import datasets
import evaluate
import sacrebleu

_DESCRIPTION = """Corpus-level BLEU (Papineni et al., 2002) computed by sacrebleu (Post, 2018): modified n-gram
precisions for n = 1..4 combined by a geometric mean and a brevity penalty, on sacrebleu's
standard tokenisation (13a by default)."""

_CITATION = """@inproceedings{post-2018-call,
  title = "A Call for Clarity in Reporting {BLEU} Scores",
  author = "Post, Matt",
  booktitle = "Proceedings of the Third Conference on Machine Translation: Research Papers",
  year = "2018",
  pages = "186--191",
}"""

_INPUTS = """
Args:
    predictions: list of strings, one per example.
    references: list of strings, or list of lists of strings (several references per example,
        the same count for every example).
    tokenize: sacrebleu tokenizer name ("13a", "intl", "zh", "char", "none", ...). Default "13a".
    lowercase: compare in lower case. Default False.
    smooth_method: "exp", "floor", "add-k" or "none". Default "exp".
    smooth_value: the smoothing value for "floor" and "add-k". Default None (sacrebleu's own).
Returns:
    bleu (0-100), precisions (four n-gram precisions, 0-100), brevity_penalty, length_ratio,
    sys_len, ref_len, signature.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class Bleu(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_INPUTS,
            homepage="https://github.com/mjpost/sacrebleu",
            features=[
                datasets.Features({"predictions": datasets.Value("string"),
                                   "references": datasets.Sequence(datasets.Value("string"))}),
                datasets.Features({"predictions": datasets.Value("string"),
                                   "references": datasets.Value("string")}),
            ],
        )

    def _compute(self, predictions, references, tokenize="13a", lowercase=False, smooth_method="exp",
                 smooth_value=None):
        if len(predictions) != len(references):
            raise ValueError(f"bleu: {len(predictions)} predictions for {len(references)} references")
        refs = [[r] if isinstance(r, str) else list(r) for r in references]
        counts = {len(r) for r in refs}
        if len(counts) > 1:
            raise ValueError(f"bleu: every prediction needs the same number of references, got {sorted(counts)}")
        transposed = [list(column) for column in zip(*refs)]  # sacrebleu wants one stream per reference
        metric = sacrebleu.BLEU(tokenize=tokenize, lowercase=lowercase, smooth_method=smooth_method,
                                smooth_value=smooth_value)
        score = metric.corpus_score(list(predictions), transposed)
        return {"bleu": score.score, "precisions": list(score.precisions), "brevity_penalty": score.bp,
                "length_ratio": score.ratio, "sys_len": score.sys_len, "ref_len": score.ref_len,
                "signature": str(metric.get_signature())}

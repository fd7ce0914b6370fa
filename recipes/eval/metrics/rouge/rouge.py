"""ROUGE-1/2/L/Lsum from Google's rouge-score package, as a local `evaluate` module (no Hub download).

    import evaluate
    rouge = evaluate.load("recipes/eval/metrics/rouge")
    rouge.compute(predictions=["the cat sat"], references=["the cat sat down"])

Scores are F-measures averaged over examples (a plain mean, so the same inputs always give the same
numbers; the Hub's rouge module bootstraps a confidence interval instead). With several references
per example, each example takes its best reference (rouge-score's `score_multi`). rouge-score's
tokenizer keeps only ASCII letters and digits, so text in other scripts (Chinese, say) scores 0:
use BLEU with `tokenize: zh` there. The Porter stemmer comes from nltk's code; no nltk data is read.
"""

import datasets
import evaluate
from rouge_score import rouge_scorer

_DESCRIPTION = """ROUGE (Lin, 2004): n-gram (rouge1, rouge2) and longest-common-subsequence (rougeL; rougeLsum
splits on newlines first) overlap between a prediction and its reference, as F-measures."""

_CITATION = """@inproceedings{lin-2004-rouge,
  title = "{ROUGE}: A Package for Automatic Evaluation of Summaries",
  author = "Lin, Chin-Yew",
  booktitle = "Text Summarization Branches Out",
  year = "2004",
  pages = "74--81",
}"""

_INPUTS = """
Args:
    predictions: list of strings, one per example.
    references: list of strings, or list of lists of strings (best reference per example counts).
    rouge_types: which scores, default ["rouge1", "rouge2", "rougeL", "rougeLsum"].
    use_stemmer: Porter-stem words before matching. Default False.
    use_aggregator: True (default) gives the mean over examples; False gives one list per type.
Returns:
    one entry per rouge type: the mean F-measure (0-1), or the per-example F-measures.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class Rouge(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_INPUTS,
            homepage="https://github.com/google-research/google-research/tree/master/rouge",
            features=[
                datasets.Features({"predictions": datasets.Value("string"),
                                   "references": datasets.Sequence(datasets.Value("string"))}),
                datasets.Features({"predictions": datasets.Value("string"),
                                   "references": datasets.Value("string")}),
            ],
        )

    def _compute(self, predictions, references, rouge_types=None, use_stemmer=False, use_aggregator=True):
        if len(predictions) != len(references):
            raise ValueError(f"rouge: {len(predictions)} predictions for {len(references)} references")
        rouge_types = list(rouge_types or ["rouge1", "rouge2", "rougeL", "rougeLsum"])
        scorer = rouge_scorer.RougeScorer(rouge_types, use_stemmer=use_stemmer)
        per_type = {t: [] for t in rouge_types}
        for prediction, reference in zip(predictions, references):
            if isinstance(reference, str):
                scores = scorer.score(reference, prediction)  # rouge-score takes (target, prediction)
            else:
                scores = scorer.score_multi(list(reference), prediction)
            for t in rouge_types:
                per_type[t].append(scores[t].fmeasure)
        if not use_aggregator:
            return per_type
        return {t: sum(v) / len(v) if v else 0.0 for t, v in per_type.items()}

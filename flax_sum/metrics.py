"""Evaluation metrics: ROUGE as Hugging Face reports it, summed training metrics, Lead-n.

ROUGE follows `run_summarization.py` + `evaluate`'s "rouge" metric, computed offline with the
`rouge-score` package: texts are stripped, sentences are put on their own lines (for rougeLsum),
each example gets an F-measure and the F-measures are averaged, then reported x100 rounded to
4 decimals. HF splits sentences with nltk's punkt (a download); `split_sentences` is a regex
stand-in that agrees with punkt on ordinary English and DialogSum text.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from rouge_score import rouge_scorer

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")

# Words that end in a period without ending a sentence (lowercased, final period removed).
ABBREVIATIONS = frozenset({
    "mr", "mrs", "ms", "dr", "prof", "st", "jr", "sr", "vs", "e.g", "i.e", "etc", "u.s",
    "a.m", "p.m",
})
# Abbreviations only before a number ("No. 5"); otherwise "no." is the word "no".
NUMBER_ABBREVIATIONS = frozenset({"no", "nos"})

_OPENING_QUOTES = "\"'\u201c\u2018(["
_CLOSING_QUOTES = "\"'\u201d\u2019)]"
# A sentence end: terminal punctuation, optional closing quotes/brackets, whitespace, and a
# sentence start (uppercase letter, digit, `#` as in `#Person1#`, or an opening quote/bracket).
_BOUNDARY_RE = re.compile(
    rf"[.!?]+[{re.escape(_CLOSING_QUOTES)}]*(?P<gap>\s+)"
    rf"(?=[{re.escape(_OPENING_QUOTES)}]*[A-Z0-9#])")
_SINGLE_INITIAL_RE = re.compile(r"[A-Z]")


def _is_abbreviation(text_before_period: str, next_char: str) -> bool:
  """Whether the word right before a '.' is an abbreviation or a single initial."""
  words = text_before_period.split()
  if not words:
    return False
  word = words[-1].lstrip(_OPENING_QUOTES)
  if word.lower() in NUMBER_ABBREVIATIONS:
    return next_char.isdigit()
  return word.lower() in ABBREVIATIONS or _SINGLE_INITIAL_RE.fullmatch(word) is not None


def split_sentences(text: str) -> list[str]:
  """Splits text into stripped sentences, like nltk's `sent_tokenize` on ordinary text.

  A sentence ends after '.', '!' or '?' (plus any closing quotes/brackets) when whitespace and
  an uppercase letter, digit, quote, bracket or '#' follow. Abbreviations such as "Mr." or
  "e.g." and single initials ("J. Smith") do not end sentences; decimals ("3.5") never match.
  Newlines alone are not boundaries (as in punkt).
  """
  sentences = []
  start = 0
  for match in _BOUNDARY_RE.finditer(text):
    punctuation = match.group(0)[:match.start("gap") - match.start()].rstrip(_CLOSING_QUOTES)
    if punctuation == "." and _is_abbreviation(text[start:match.start()], text[match.end()]):
      continue
    sentences.append(text[start:match.start("gap")].strip())
    start = match.end()
  sentences.append(text[start:].strip())
  return [sentence for sentence in sentences if sentence]


def _postprocess(text: str) -> str:
  """HF's `postprocess_text`: strip, then one sentence per line (used by rougeLsum)."""
  return "\n".join(split_sentences(text.strip()))


@functools.lru_cache(maxsize=1)
def _scorer() -> rouge_scorer.RougeScorer:
  return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def compute_rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
  """ROUGE-1/2/L/Lsum of predictions against references, as HF's run_summarization reports it.

  Each value is the plain mean over examples of the F-measure, x100, rounded to 4 decimals.
  (`evaluate`'s default BootstrapAggregator reports the mid-point of bootstrap resample means,
  which is close to this mean but random; the plain mean is deterministic.)
  """
  if len(predictions) != len(references):
    raise ValueError(f"Got {len(predictions)} predictions but {len(references)} references.")
  if not predictions:
    raise ValueError("compute_rouge needs at least one prediction.")
  scorer = _scorer()
  totals = dict.fromkeys(ROUGE_TYPES, 0.0)
  for prediction, reference in zip(predictions, references):
    scores = scorer.score(_postprocess(reference), _postprocess(prediction))
    for rouge_type in ROUGE_TYPES:
      totals[rouge_type] += scores[rouge_type].fmeasure
  return {name: round(total / len(predictions) * 100, 4) for name, total in totals.items()}


def mean_generation_length(token_id_rows: Iterable[Sequence[int]], pad_id: int = 0) -> float:
  """HF's `gen_len`: the mean number of non-pad tokens per generated row, rounded to 4 decimals."""
  lengths = [int(np.count_nonzero(np.asarray(row) != pad_id)) for row in token_id_rows]
  if not lengths:
    raise ValueError("mean_generation_length needs at least one row.")
  return round(float(np.mean(lengths)), 4)


# Summed metrics: a step returns sums over its batch, e.g. {"loss": summed token loss,
# "accuracy": number of correct tokens, "denominator": number of (non-pad) tokens}; sums are
# added across batches and divided once at the end, so every token weighs the same whatever
# the batch sizes.
DENOMINATOR_KEY = "denominator"


def accumulate(totals: Mapping[str, float] | None,
               batch_sums: Mapping[str, Any]) -> dict[str, float]:
  """Adds one batch's summed metrics to the running totals (None starts a new total).

  Values may be Python numbers or numpy/JAX arrays; arrays are summed in float64, so pass
  per-device partial sums as they are but unreplicate `psum`-ed (replicated) pmap outputs first,
  e.g. `jax.tree.map(lambda x: x[0], sums)`. Returns a new dict; `totals` is not modified.
  """
  new_totals = dict(totals or {})
  for name, value in batch_sums.items():
    new_totals[name] = new_totals.get(name, 0.0) + float(np.sum(np.asarray(value, np.float64)))
  return new_totals


def finalize(totals: Mapping[str, float]) -> dict[str, float]:
  """Divides every summed metric by the summed denominator: {"loss": mean token loss, ...}."""
  denominator = totals.get(DENOMINATOR_KEY, 0.0)
  if denominator <= 0:
    raise ValueError(f"Cannot average metrics over a {DENOMINATOR_KEY} of {denominator}.")
  return {name: value / denominator for name, value in totals.items() if name != DENOMINATOR_KEY}


def lead_n(dialogue_or_document: str, n: int) -> str:
  """The Lead-n baseline: the first n lines of a multi-line text (DialogSum utterances such as
  `#Person1#: ...`), otherwise the first n sentences."""
  if n < 1:
    raise ValueError(f"lead_n needs n >= 1, got {n}.")
  text = dialogue_or_document.strip()
  if "\n" in text:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return "\n".join(lines[:n])
  return " ".join(split_sentences(text)[:n])

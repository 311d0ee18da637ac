"""Tests for ROUGE, the sentence splitter, summed metrics, Lead-n and the baseline CLI."""

import json
import subprocess
import sys

import numpy as np
import pytest

from flax_sum import baseline
from flax_sum.metrics import (accumulate, compute_rouge, finalize, lead_n,
                              mean_generation_length, split_sentences)

ROUGE_KEYS = {"rouge1", "rouge2", "rougeL", "rougeLsum"}


def test_identical_texts_score_100():
  scores = compute_rouge(["The cat sat on the mat."], ["The cat sat on the mat."])
  assert scores == dict.fromkeys(ROUGE_KEYS, 100.0)


def test_disjoint_texts_score_0():
  assert compute_rouge(["alpha beta gamma"], ["delta epsilon"]) == dict.fromkeys(ROUGE_KEYS, 0.0)


def test_prefix_prediction_by_hand():
  # rouge1/L: P = 3/3, R = 3/6, F = 2/3. rouge2: P = 2/2, R = 2/5, F = 0.8/1.4 = 4/7.
  scores = compute_rouge(["the cat sat"], ["the cat sat on the mat"])
  assert scores == {"rouge1": 66.6667, "rouge2": 57.1429, "rougeL": 66.6667,
                    "rougeLsum": 66.6667}


def test_scores_are_mean_over_examples():
  scores = compute_rouge(["the cat sat", "x y"], ["the cat sat", "z w"])
  assert scores == dict.fromkeys(ROUGE_KEYS, 50.0)


def test_stemming_and_case():
  assert compute_rouge(["Running"], ["run"])["rouge1"] == 100.0


def test_rouge_lsum_uses_sentences():
  # Swapped sentences: the LCS over the whole text is 3 of 6 tokens (rougeL = 50), but each
  # reference sentence is fully covered by one predicted sentence (rougeLsum = 100).
  # Bigrams: 4 of 5 shared ("sat the" vs "ran the") -> rouge2 = 80.
  scores = compute_rouge(["The cat sat. The dog ran."], ["The dog ran. The cat sat."])
  assert scores == {"rouge1": 100.0, "rouge2": 80.0, "rougeL": 50.0, "rougeLsum": 100.0}


def test_surrounding_whitespace_is_ignored():
  assert compute_rouge(["  the cat sat \n"], ["the cat sat"]) == dict.fromkeys(ROUGE_KEYS, 100.0)


@pytest.mark.parametrize("predictions, references", [([], []), (["a"], []), (["a"], ["a", "b"])])
def test_compute_rouge_rejects_bad_lengths(predictions, references):
  with pytest.raises(ValueError):
    compute_rouge(predictions, references)


def test_compute_rouge_is_fast_enough():
  import time
  predictions = ["#Person1# asks #Person2# about the trip. They will leave at 5 p.m."] * 500
  references = ["#Person2# tells #Person1# the trip starts at 5. #Person1# agrees."] * 500
  start = time.perf_counter()
  compute_rouge(predictions, references)
  assert time.perf_counter() - start < 3.0


@pytest.mark.parametrize("text, expected", [
    ("The cat sat. The dog ran.", ["The cat sat.", "The dog ran."]),
    ("Is it late? Yes! We go now.", ["Is it late?", "Yes!", "We go now."]),
    ("Mr. Smith met Dr. Jones at St. Mary's. They talked.",
     ["Mr. Smith met Dr. Jones at St. Mary's.", "They talked."]),
    ("Mrs. Brown and Prof. White came, e.g. Sam, i.e. a friend, etc. Then they ate.",
     ["Mrs. Brown and Prof. White came, e.g. Sam, i.e. a friend, etc. Then they ate."]),
    ("I met J. R. Smith today. It was nice.", ["I met J. R. Smith today.", "It was nice."]),
    ("The price rose 3.5 percent. Sales fell 2.25 points.",
     ["The price rose 3.5 percent.", "Sales fell 2.25 points."]),
    ("They left at 5 p.m. on Monday. The U.S. team won.",
     ["They left at 5 p.m. on Monday.", "The U.S. team won."]),
    ("#Person1# asks #Person2# for help. #Person2# agrees.",
     ["#Person1# asks #Person2# for help.", "#Person2# agrees."]),
    ('He said "Stop!" Then he left.', ['He said "Stop!"', "Then he left."]),
    ('"Go home." She did.', ['"Go home."', "She did."]),
    ("It ended. \"Really?\" he asked.", ["It ended.", '"Really?" he asked.']),
    ("He waited (for hours.) Then he slept.", ["He waited (for hours.)", "Then he slept."]),
    ("We won in 2020. 2021 was worse.", ["We won in 2020.", "2021 was worse."]),
    ("Read item No. 5 first. No. I will not.", ["Read item No. 5 first.", "No.", "I will not."]),
    ("it costs 5. dollars are cheap.", ["it costs 5. dollars are cheap."]),
    ("Wait... What happened?", ["Wait...", "What happened?"]),
    ("  No ending punctuation  ", ["No ending punctuation"]),
    ("", []),
])
def test_split_sentences(text, expected):
  assert split_sentences(text) == expected


def test_lead_n_on_dialogue_takes_utterances():
  dialogue = ("#Person1#: Hello, Mr. Lee. How are you?\n#Person2#: Fine.\n\n"
              "#Person1#: Good.\n")
  assert lead_n(dialogue, 2) == "#Person1#: Hello, Mr. Lee. How are you?\n#Person2#: Fine."
  assert lead_n(dialogue, 10) == "#Person1#: Hello, Mr. Lee. How are you?\n#Person2#: Fine.\n" \
      "#Person1#: Good."


def test_lead_n_on_plain_text_takes_sentences():
  document = "Dr. Who arrived at 3.5 p.m. today. Crowds cheered! Nobody left. It rained."
  assert lead_n(document, 1) == "Dr. Who arrived at 3.5 p.m. today."
  assert lead_n(document, 3) == "Dr. Who arrived at 3.5 p.m. today. Crowds cheered! Nobody left."
  with pytest.raises(ValueError):
    lead_n(document, 0)


def test_mean_generation_length_counts_non_pad_tokens():
  rows = np.array([[0, 5, 6, 1, 0, 0], [0, 7, 1, 0, 0, 0], [0, 4, 4, 4, 1, 0]])
  assert mean_generation_length(rows) == 3.0
  assert mean_generation_length([[9, 9, 2], [2, 2, 2]], pad_id=2) == 1.0
  with pytest.raises(ValueError):
    mean_generation_length([])


def test_summed_metrics_are_token_weighted():
  # Batch means are 1.0 (3 tokens) and 5.0 (2 tokens); the token-weighted mean is 13 / 5.
  totals = accumulate(None, {"loss": 3.0, "accuracy": 3.0, "denominator": 3})
  totals = accumulate(totals, {"loss": np.float32(10.0), "accuracy": np.array(1.0),
                               "denominator": np.array(2)})
  assert totals == {"loss": 13.0, "accuracy": 4.0, "denominator": 5.0}
  assert finalize(totals) == {"loss": 2.6, "accuracy": 0.8}


def test_summed_metrics_sum_per_device_arrays_and_do_not_mutate():
  first = accumulate(None, {"loss": np.array([1.0, 2.0]), "denominator": np.array([1, 3])})
  second = accumulate(first, {"loss": np.array([3.0, 4.0]), "denominator": np.array([2, 2])})
  assert first == {"loss": 3.0, "denominator": 4.0}
  assert finalize(second) == {"loss": 10.0 / 8.0}


def test_finalize_rejects_zero_denominator():
  with pytest.raises(ValueError):
    finalize({"loss": 0.0, "denominator": 0.0})
  with pytest.raises(ValueError):
    finalize({})


@pytest.fixture
def tiny_jsonl(tmp_path):
  rows = [
      {"id": "a", "dialogue": "#Person1#: The cat sat.\n#Person2#: On the mat.\n#Person1#: Ok.",
       "summary": "The cat sat on the mat."},
      {"id": "b", "dialogue": "#Person1#: Hi.\n#Person2#: Bye.", "summary": "Unrelated words."},
  ]
  path = tmp_path / "tiny.jsonl"
  path.write_text("".join(json.dumps(row) + "\n" for row in rows))
  return path


def test_baseline_main_prints_rouge(tiny_jsonl, capsys):
  assert baseline.main(["--file", str(tiny_jsonl), "--text_column", "dialogue",
                        "--summary_column", "summary", "--lead", "2"]) == 0
  scores = json.loads(capsys.readouterr().out)
  assert set(scores) == ROUGE_KEYS | {"num_examples"}
  assert scores["num_examples"] == 2
  # Example a: lead-2 tokens "person1 the cat sat person2 on the mat" (8) vs 6 reference
  # tokens, all 6 matched: F = 2 * 0.75 * 1 / 1.75 = 6/7. Example b: 0. Mean: 3/7.
  assert scores["rouge1"] == 42.8571


def test_baseline_reports_missing_column(tiny_jsonl, capsys):
  assert baseline.main(["--file", str(tiny_jsonl), "--text_column", "article"]) == 2
  assert "'article'" in capsys.readouterr().err


def test_baseline_runs_as_module(tiny_jsonl):
  result = subprocess.run(
      [sys.executable, "-m", "flax_sum.baseline", "--file", str(tiny_jsonl), "--lead", "1"],
      capture_output=True, text=True, check=True)
  assert set(json.loads(result.stdout)) == ROUGE_KEYS | {"num_examples"}


def test_baseline_max_samples_scores_only_the_first_rows(tiny_jsonl, capsys):
  assert baseline.main(["--file", str(tiny_jsonl), "--lead", "2", "--max_samples", "1"]) == 0
  scores = json.loads(capsys.readouterr().out)
  assert scores["num_examples"] == 1
  assert scores["rouge1"] == 85.7143  # Example a alone: 6/7.
  assert baseline.main(["--file", str(tiny_jsonl), "--max_samples", "0"]) == 2
  assert "--max_samples must be at least 1" in capsys.readouterr().err

"""ROUGE of the Lead-n baseline on a .jsonl/.json/.csv file, scored like the trainer's evaluation.

  python -m flax_sum.baseline --file flax_sum/assets/dialogsum/validation.jsonl \\
      --text_column dialogue --summary_column summary --lead 2 [--max_samples 200]
"""

from __future__ import annotations

import argparse
import csv
import json
import pathlib
import sys
from collections.abc import Sequence

from flax_sum.errors import UserError
from flax_sum.metrics import compute_rouge, lead_n


def read_records(path: pathlib.Path) -> list[dict]:
  """Rows of a .csv file, a JSON-lines file, or a .json file holding a list of objects."""
  if not path.is_file():
    raise UserError(f"--file {path} does not exist: pass a .jsonl, .json or .csv file.")
  text = path.read_text(encoding="utf-8")
  if path.suffix == ".csv":
    return list(csv.DictReader(text.splitlines()))
  if text.lstrip().startswith("["):
    return json.loads(text)
  return [json.loads(line) for line in text.splitlines() if line.strip()]


def lead_baseline_rouge(records: Sequence[dict], text_column: str, summary_column: str,
                        lead: int) -> dict[str, float]:
  """ROUGE of the first `lead` utterances/sentences of each text against its summary."""
  if not records:
    raise UserError("The file has no rows.")
  for column in (text_column, summary_column):
    if column not in records[0]:
      raise UserError(f"Column {column!r} is not in the file (columns: "
                      f"{', '.join(records[0])}): pass --text_column/--summary_column.")
  predictions = [lead_n(record[text_column], lead) for record in records]
  references = [record[summary_column] for record in records]
  return compute_rouge(predictions, references)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--file", required=True, type=pathlib.Path)
  parser.add_argument("--text_column", default="dialogue")
  parser.add_argument("--summary_column", default="summary")
  parser.add_argument("--lead", type=int, default=2, help="Utterances/sentences to keep.")
  parser.add_argument("--max_samples", type=int, default=None,
                      help="Score only the first N rows (as --max_eval_samples does).")
  args = parser.parse_args(argv)
  try:
    if args.lead < 1:
      raise UserError(f"--lead must be at least 1, got {args.lead}.")
    if args.max_samples is not None and args.max_samples < 1:
      raise UserError(f"--max_samples must be at least 1, got {args.max_samples}.")
    records = read_records(args.file)[:args.max_samples]
    scores = lead_baseline_rouge(records, args.text_column, args.summary_column, args.lead)
  except UserError as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  print(json.dumps({**scores, "num_examples": len(records)}))
  return 0


if __name__ == "__main__":
  sys.exit(main())

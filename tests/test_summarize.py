"""The summarize command: order, line counts, batching and sharding, files and errors."""

import io
import json
import os
import pathlib
import subprocess
import sys

import jax
import pytest
import transformers

from flax_sum import config as config_lib
from flax_sum import hf_checkpoint
from flax_sum import summarize
from flax_sum.model import T5Config, init_params

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCUMENTS = ["The cat sat on the mat and looked at the birds.",
             "Rain is expected tomorrow in the north, with sun later in the week.",
             "",
             "Stocks rose sharply on Monday as investors welcomed the news.",
             "A short one.",
             "The committee met again to discuss the budget for next year and the new park.",
             "Hello world.",
             "Scientists found a new species of frog in the rainforest.",
             "The match ended in a draw after extra time.",
             "Tea or coffee?",
             "Long " * 40]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  tokenizer = transformers.T5Tokenizer.from_pretrained(str(config_lib.BUNDLED_TOKENIZER_DIR))
  config = T5Config(vocab_size=len(tokenizer), d_model=16, d_kv=4, d_ff=32, num_layers=1,
                    num_heads=2, relative_attention_num_buckets=8,
                    relative_attention_max_distance=16,
                    extra={"task_specific_params": {"summarization": {
                        "num_beams": 2, "max_length": 9, "no_repeat_ngram_size": 2,
                        "prefix": "summarize: "}}})
  out = tmp_path_factory.mktemp("summarize-model")
  hf_checkpoint.save_pretrained(str(out), config, init_params(config, jax.random.key(0)),
                                tokenizer)
  return str(out)


@pytest.fixture(scope="module")
def summarizer(model_dir):
  return summarize.Summarizer(model_dir)


def test_settings_and_prefix_come_from_the_model(summarizer):
  assert summarizer.settings.num_beams == 2 and summarizer.settings.max_new_tokens == 8
  assert summarizer.settings.no_repeat_ngram_size == 2
  assert summarizer.default_prefix == "summarize: "


def test_batches_equal_one_by_one_in_order(summarizer):
  batched = summarizer(DOCUMENTS, batch_size=8)  # 2 batches on 8 devices; the last is padded.
  assert len(batched) == len(DOCUMENTS)
  assert any(batched) and len(set(batched)) > 1
  one_by_one = [summarizer([doc], batch_size=1)[0] for doc in DOCUMENTS[:4]]
  assert batched[:4] == one_by_one
  assert summarizer(DOCUMENTS[::-1], batch_size=16) == batched[::-1]


def test_main_reads_stdin_and_files(model_dir, summarizer, tmp_path):
  stdout = io.StringIO()
  code = summarize.main(["--model", model_dir, "--batch_size", "3"],
                        stdin=io.StringIO("\n".join(DOCUMENTS) + "\n"), stdout=stdout)
  assert code == 0
  assert stdout.getvalue().split("\n")[:-1] == summarizer(DOCUMENTS)
  rows = [{"id": i, "article": doc} for i, doc in enumerate(DOCUMENTS[:5])]
  (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  stdout = io.StringIO()
  assert summarize.main(["--model", model_dir, "--input_file", str(tmp_path / "docs.jsonl"),
                         "--text_column", "article"], stdout=stdout) == 0
  assert stdout.getvalue().split("\n")[:-1] == summarizer(DOCUMENTS[:5])
  (tmp_path / "docs.csv").write_text("article,id\n" + "".join(
      f'"{doc}",{i}\n' for i, doc in enumerate(DOCUMENTS[:3])))
  stdout = io.StringIO()
  assert summarize.main(["--model", model_dir, "--input_file", str(tmp_path / "docs.csv"),
                         "--num_beams", "1"], stdout=stdout) == 0
  greedy = summarize.Summarizer(model_dir, generation={"num_beams": 1})
  assert stdout.getvalue().split("\n")[:-1] == greedy(DOCUMENTS[:3])


@pytest.mark.parametrize("args,message", [
    (["--input_file", "missing.jsonl"], "error: --input_file missing.jsonl: no such file"),
    (["--text_column", "x"], "error: --text_column needs --input_file"),
    (["--max_length", "1"], "error: --generation_max_length leaves no token to generate"),
    (["--num_beams", "two"], "error: argument --num_beams: invalid int value"),
])
def test_user_errors_are_one_line(model_dir, args, message, capsys):
  assert summarize.main(["--model", model_dir, *args], stdin=io.StringIO("a\n")) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith(message) and "\n" not in err


def test_subprocess(model_dir, summarizer):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  result = subprocess.run([sys.executable, "-m", "flax_sum.summarize", "--model", model_dir,
                           "--batch_size", "4"], input="\n".join(DOCUMENTS[:5]) + "\n",
                          capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.split("\n")[:-1] == summarizer(DOCUMENTS[:5])
  assert "doc" in result.stderr  # tqdm's progress bar.
  bad = subprocess.run([sys.executable, "-m", "flax_sum.summarize", "--model",
                        str(pathlib.Path(model_dir) / "nope")], input="", capture_output=True,
                       text=True, cwd=REPO_ROOT, env=env, timeout=300)
  assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr

"""`python -m flax_sum.bench` end to end on a tiny model (flax-sum side only)."""

import json

from flax_sum import bench
from flax_sum.model import T5Config


def test_bench_reports_every_part(tmp_path, capsys):
  config = T5Config(vocab_size=32128, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)
  config_path = tmp_path / "config.json"
  config_path.write_text(json.dumps(config.to_hf_dict()))
  report = bench.main(["--model_config", str(config_path), "--skip_torch", "--train_steps", "2",
                       "--train_batch_size", "2", "--source_length", "64",
                       "--target_length", "16", "--padding_source_length", "384",
                       "--padding_target_length", "32", "--generate_batch_size", "2",
                       "--max_new_tokens", "4", "--repeats", "1", "--train_dtype", "bfloat16"])
  assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(report))
  train, padding, generate = report["train"], report["padding"], report["generate"]
  assert train["flax_sum_samples_per_second"] > 0 and train["mfu"] > 0
  assert train["matmuls_only_samples_per_second"] > 0 and train["matmuls_only_mfu"] > 0
  assert train["dtype"] == "bfloat16"  # The padding part stays float32.
  assert "transformers_samples_per_second" not in train
  # Dialogues are far shorter than 384 tokens: the buckets cut most of the padding.
  assert padding["pad_to_max_mean_padded_lengths"] == [384.0, 32.0]
  assert padding["length_buckets_mean_padded_lengths"][0] <= 288
  assert padding["speedup"] > 0
  assert generate["flax_sum_summaries_per_second"] > 0
  assert generate["matmuls_only_summaries_per_second"] > 0
  assert generate["settings"]["num_beams"] == 4

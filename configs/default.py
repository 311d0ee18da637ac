"""The embedded default: a small T5 trained from scratch on the bundled DialogSum, offline on CPU.

`./run.sh` trains it; every key is documented in flax_sum/config.py and `-h`.
"""

from flax_sum import config as config_lib


def get_config():
  config = config_lib.base_config()
  # A t5-small-shaped vocabulary and architecture, shrunk to train in minutes on a CPU.
  config.config_name = str(config_lib.ASSETS_DIR / "t5-mini" / "config.json")
  config.tokenizer_name = str(config_lib.BUNDLED_TOKENIZER_DIR)

  config.train_file = str(config_lib.BUNDLED_DIALOGSUM_DIR / "train.jsonl")
  config.validation_file = str(config_lib.BUNDLED_DIALOGSUM_DIR / "validation.jsonl")
  config.test_file = str(config_lib.BUNDLED_DIALOGSUM_DIR / "test.jsonl")
  config.text_column = "dialogue"
  config.summary_column = "summary"
  config.source_prefix = "summarize: "
  config.max_source_length = 256
  config.max_target_length = 64
  config.max_eval_samples = 200
  config.max_predict_samples = 200

  config.output_dir = "output/dialogsum-t5-mini"
  config.do_train = True
  config.do_eval = True
  config.do_predict = True
  config.predict_with_generate = True

  config.per_device_train_batch_size = 16
  config.per_device_eval_batch_size = 32
  config.learning_rate = 1e-3
  config.warmup_steps = 50
  config.weight_decay = 0.01
  config.max_steps = 400
  config.logging_steps = 20
  config.eval_steps = 200
  config.save_steps = 200
  return config

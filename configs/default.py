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
  # Whole for about half the dialogues and 70% of the summaries (medians: 204 and 38 tokens);
  # the openings carry the topic, and shorter sequences buy more steps in the time budget.
  config.max_source_length = 192
  config.max_target_length = 48
  config.max_eval_samples = 200
  config.max_predict_samples = 200

  config.output_dir = "output/dialogsum-t5-mini"
  config.do_train = True
  config.do_eval = True
  config.do_predict = True
  config.predict_with_generate = True
  # Decoding of a briefly trained model repeats itself: ban repeated trigrams and ask for
  # summary-sized outputs (DialogSum's summaries are 38 tokens at the median). Beam search
  # scores alike on models from differently rounded runs; greedy swung from 19 to 14 ROUGE-1.
  config.num_beams = 4
  config.no_repeat_ngram_size = 3
  config.min_length = 25

  # A from-scratch model on a CPU budget: few, large-learning-rate steps (tuning notes: README).
  config.per_device_train_batch_size = 16
  config.per_device_eval_batch_size = 40
  config.learning_rate = 3e-3
  config.warmup_steps = 40
  config.weight_decay = 0.01
  config.max_steps = 420
  config.logging_steps = 20
  config.save_steps = 100
  return config

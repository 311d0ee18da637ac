"""The seed recipe: fine-tune google-t5/t5-small on CNN/DailyMail 3.0.0 (Hugging Face's
`run_summarization.py` example), with the same hyper-parameters."""

from flax_sum import config as config_lib


def get_config():
  config = config_lib.base_config()
  config.model_name_or_path = "google-t5/t5-small"
  config.dataset_name = "cnn_dailymail"
  config.dataset_config = "3.0.0"
  config.source_prefix = "summarize: "
  config.max_source_length = 1024
  config.max_target_length = 128
  config.output_dir = "output/tst-summarization"
  config.do_train = True
  config.do_eval = True
  config.predict_with_generate = True
  config.per_device_train_batch_size = 4
  config.per_device_eval_batch_size = 4
  # The seed's learning rate (the Trainer default); AdamW at 5e-5 is the published recipe.
  config.learning_rate = 5e-5
  return config

"""The configuration schema: every key, its Hugging Face default, its flags and its help.

One `ml_collections.ConfigDict` is the single source of truth for a run. `base_config()` holds
the defaults of Hugging Face's `run_summarization.py` (so a seed command means the same thing
here); `configs/*.py` start from it and change what their recipe needs.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import ml_collections
from ml_collections import config_dict

ASSETS_DIR = pathlib.Path(__file__).resolve().parent / "assets"
BUNDLED_TOKENIZER_DIR = ASSETS_DIR / "t5"
BUNDLED_DIALOGSUM_DIR = ASSETS_DIR / "dialogsum"


@dataclasses.dataclass(frozen=True)
class Field:
  key: str
  default: Any
  type: type
  help: str
  group: str
  aliases: tuple[str, ...] = ()


# Keys whose default is None carry their type here so `--config.key=value` still type-checks.
FIELDS: tuple[Field, ...] = (
    # Model.
    Field("model_name_or_path", None, str, "Pretrained model: a Hub id or a local directory with "
          "config.json + model.safetensors.", "model"),
    Field("config_name", None, str, "A Hugging Face T5 config.json (or its directory) to start "
          "from a random init when --model_name_or_path is not given.", "model"),
    Field("tokenizer_name", None, str, "Directory holding spiece.model or tokenizer files "
          "(if None: the model's directory, else the bundled T5 vocabulary).", "model"),
    Field("cache_dir", None, str, "Where downloaded models and datasets are stored.", "model"),
    Field("dtype", "auto", str, "Compute dtype: float32, bfloat16, or auto (bfloat16 on GPUs and "
          "TPUs, float32 on CPUs); softmax and loss stay float32.", "model"),
    Field("param_dtype", "auto", str, "Dtype of the params the model computes with: float32, or "
          "bfloat16 with float32 master weights in the optimizer state; auto: the compute dtype "
          "on GPUs and TPUs, float32 on CPUs.", "model"),
    # Data.
    Field("dataset_name", None, str, "A dataset on the Hugging Face Hub, e.g. cnn_dailymail.",
          "data"),
    Field("dataset_config", None, str, "The dataset's configuration, e.g. 3.0.0.", "data",
          aliases=("dataset_config_name",)),
    Field("train_file", None, str, "Training data: a .csv, .json or .jsonl file.", "data"),
    Field("validation_file", None, str, "Evaluation data: a .csv, .json or .jsonl file.", "data"),
    Field("test_file", None, str, "Prediction data: a .csv, .json or .jsonl file.", "data"),
    Field("text_column", None, str, "Column with the documents (if None: the first column).",
          "data"),
    Field("summary_column", None, str, "Column with the summaries (if None: the second column).",
          "data"),
    Field("source_prefix", "", str, "Text put before every document, e.g. 'summarize: '.", "data"),
    Field("max_source_length", 1024, int, "Documents are truncated to this many tokens.", "data"),
    Field("max_target_length", 128, int, "Training summaries are truncated to this many tokens.",
          "data"),
    Field("val_max_target_length", None, int, "Summary length for eval/predict and generation "
          "(if None: max_target_length).", "data"),
    Field("pad_to_max_length", False, bool, "Pad every batch to max_source_length and the max "
          "target length (if false: to the shortest of --length_buckets static lengths that "
          "fits the batch's longest row).", "data"),
    Field("length_buckets", 4, int, "Static padded lengths per side, evenly spaced up to the "
          "max; XLA compiles one program per (source, target) pair that occurs.", "data"),
    Field("group_by_length", False, bool, "Batch training examples of similar source length "
          "together (sorted within shuffled groups of 50 batches), as the HF Trainer does.",
          "data"),
    Field("max_train_samples", None, int, "Use only the first N training examples.", "data"),
    Field("max_eval_samples", None, int, "Use only the first N evaluation examples.", "data"),
    Field("max_predict_samples", None, int, "Use only the first N prediction examples.", "data"),
    Field("preprocessing_num_workers", None, int, "Processes used for tokenization.", "data"),
    Field("overwrite_cache", False, bool, "Tokenize again instead of using the cache.", "data"),
    # What to run and where.
    Field("output_dir", None, str, "Where results, predictions, logs and the model are written.",
          "run"),
    Field("overwrite_output_dir", False, bool, "Start fresh in a non-empty output_dir.", "run"),
    Field("do_train", False, bool, "Train.", "run"),
    Field("do_eval", False, bool, "Evaluate on the validation data.", "run"),
    Field("do_predict", False, bool, "Predict on the test data.", "run"),
    Field("predict_with_generate", False, bool, "Generate summaries in eval/predict and score "
          "ROUGE.", "run"),
    Field("seed", 42, int, "Seed for init, data order and dropout.", "run"),
    Field("debug", False, bool, "Print the Python traceback of an error, not just its one-line "
          "message.", "run"),
    # Optimisation.
    Field("per_device_train_batch_size", 8, int, "Training examples per device per step.",
          "train"),
    Field("per_device_eval_batch_size", 8, int, "Eval/predict examples per device per step.",
          "train"),
    Field("gradient_accumulation_steps", 1, int, "Micro-batches summed into one update.", "train"),
    Field("optim", "adamw", str, "Optimizer: adamw or adafactor.", "train"),
    Field("learning_rate", 5e-5, float, "Peak learning rate.", "train"),
    Field("lr_scheduler_type", "linear", str, "Decay after warmup: linear, cosine or constant.",
          "train"),
    Field("warmup_steps", 0, int, "Linear warmup steps.", "train"),
    Field("weight_decay", 0.0, float, "AdamW weight decay (not applied to layer norms).", "train"),
    Field("adam_beta1", 0.9, float, "AdamW beta1.", "train"),
    Field("adam_beta2", 0.999, float, "AdamW beta2.", "train"),
    Field("adam_epsilon", 1e-8, float, "AdamW epsilon.", "train"),
    Field("max_grad_norm", 1.0, float, "Clip gradients to this global norm (0 disables).",
          "train"),
    Field("label_smoothing_factor", 0.0, float, "Label smoothing of the cross-entropy.", "train"),
    Field("num_train_epochs", 3.0, float, "Epochs to train (ignored when max_steps > 0).",
          "train"),
    Field("max_steps", -1, int, "Optimizer updates to run; overrides num_train_epochs when > 0.",
          "train"),
    # Generation.
    # Each None means: the model's generation_config.json, else its config.json
    # task_specific_params.summarization, else Hugging Face's default. Flags win over both.
    Field("num_beams", None, int, "Beams for generation; 1 is greedy (if None: the model's "
          "setting, else 1).", "generate", aliases=("generation_num_beams",)),
    Field("generation_max_length", None, int, "Longest generated summary, counting the decoder "
          "start token as Hugging Face does (if None: val_max_target_length).", "generate"),
    Field("max_new_tokens", None, int, "Longest generated summary in new tokens; overrides "
          "generation_max_length and val_max_target_length.", "generate"),
    Field("min_length", None, int, "Shortest generated summary, counting the decoder start token: "
          "EOS is banned until then (if None: the model's setting, else 0).", "generate"),
    Field("length_penalty", None, float, "Beam scores are log-probability sums divided by "
          "length**length_penalty (if None: the model's setting, else 1.0).", "generate"),
    Field("no_repeat_ngram_size", None, int, "Never repeat an n-gram of this size; 0 disables (if "
          "None: the model's setting, else 0).", "generate"),
    Field("early_stopping", None, bool, "Beam search stops once num_beams hypotheses are finished "
          "(false: once no running beam can beat them; if None: the model's setting, else "
          "false).", "generate"),
    # Step-based logging, evaluation and saving.
    Field("logging_steps", 500, int, "Log train loss every N updates.", "log"),
    Field("eval_steps", None, int, "Evaluate every N updates (if None: only at the end).", "log"),
    Field("save_steps", 500, int, "Save a checkpoint every N updates.", "log"),
    Field("save_total_limit", None, int, "Keep at most N checkpoints, deleting the oldest once a "
          "newer one is complete; the best is kept too when --metric_for_best_model or "
          "--load_best_model_at_end is set (if None or 0: keep all; stale-* directories are "
          "never deleted).", "log"),
    Field("load_best_model_at_end", False, bool, "Make the best evaluated checkpoint (by "
          "--metric_for_best_model) the final model that is saved, evaluated and used for "
          "predictions; needs --do_eval, --eval_steps and a --save_steps that is a multiple of "
          "it.", "log"),
    Field("metric_for_best_model", None, str, "Eval metric that picks the best checkpoint: "
          "loss, accuracy, or with --predict_with_generate rouge1, rouge2, rougeL, rougeLsum, "
          "gen_len; the eval_ prefix is optional (if None: loss).", "log"),
    Field("greater_is_better", None, bool, "Whether a larger --metric_for_best_model is better "
          "(if None: false for loss, true otherwise).", "log"),
    # Resuming (listed with checkpoints), the Hub and precision.
    Field("resume_from_checkpoint", None, str, "Resume training exactly from this checkpoint "
          "(OUTPUT_DIR/checkpoints/STEP, or an output_dir for its latest); without it, a "
          "training run resumes from the latest checkpoint in output_dir unless "
          "--overwrite_output_dir is given.", "log"),
    Field("push_to_hub", False, bool, "Upload the final model, tokenizer, a model card, results "
          "and logs (not checkpoints) to the Hub; the login is checked before training.",
          "later"),
    Field("hub_model_id", None, str, "Hub repository: NAME (in your namespace) or OWNER/NAME "
          "(default: output_dir's name).", "later", aliases=("push_to_hub_model_id",)),
    Field("fp16", False, bool, "float16 mixed precision: runs as bfloat16 (T5 overflows in "
          "float16).", "later"),
    Field("bf16", False, bool, "bfloat16 compute.", "later"),
    # Several processes, one per host (see flax_sum.distributed).
    Field("coordinator_address", None, str, "HOST:PORT of process 0 for a multi-host run, "
          "reachable from every host; every process gets the same value and --num_processes "
          "(if None: detected on Cloud TPU VMs and under SLURM's srun, else one process).",
          "distributed"),
    Field("num_processes", None, int, "Processes in a multi-host run, one per host, each "
          "driving all of its devices (if None: detected, else 1).", "distributed"),
    Field("process_id", None, int, "This process's rank, 0 to num_processes - 1; process 0 "
          "runs on the coordinator's host and writes every output (if None: detected).",
          "distributed"),
)

FIELDS_BY_KEY = {f.key: f for f in FIELDS}

# Keys that name where the model or the data comes from. When a command line names any of them,
# it brings its own recipe, and the run starts from `base_config()` rather than the embedded
# default (see flax_sum.cli).
SOURCE_KEYS = ("model_name_or_path", "config_name", "dataset_name", "train_file",
               "validation_file", "test_file")
MODE_KEYS = ("do_train", "do_eval", "do_predict")


def base_config() -> ml_collections.ConfigDict:
  """Every key with Hugging Face `run_summarization.py`'s default."""
  config = ml_collections.ConfigDict()
  for field in FIELDS:
    if field.default is None:
      config[field.key] = config_dict.placeholder(field.type)
    else:
      config[field.key] = field.type(field.default)
  return config

"""Checkpoints export to Hugging Face directories: exact params, tokenizer, generation config."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
import transformers

import helpers
from flax_sum import checkpoints
from flax_sum import config as config_lib
from flax_sum import export
from flax_sum import hf_checkpoint
from flax_sum.model import T5, T5Config, init_params
from flax_sum.steps import TrainState

MODEL_FILES = {"config.json", "model.safetensors", "generation_config.json"}
BUNDLED_TOKENIZER_SIZE = 32100


def tiny_config() -> T5Config:
  # A T5 v1.1 / flan-style model with the bundled tokenizer's vocabulary.
  return T5Config(vocab_size=32128, d_model=8, d_kv=4, d_ff=16, num_layers=1,
                  num_decoder_layers=2, num_heads=2, relative_attention_num_buckets=8,
                  relative_attention_max_distance=16, feed_forward_proj="gated-gelu",
                  tie_word_embeddings=False)


def train_state(params) -> TrainState:
  state = TrainState.create(apply_fn=T5(tiny_config()).apply, params=params,
                            tx=optax.adamw(1e-3))
  grads = jax.tree.map(np.ones_like, params)
  return state.apply_gradients(grads=grads)  # Non-trivial optimizer state and step.


def assert_trees_equal(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    assert np.asarray(a).dtype == np.asarray(e).dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A training output_dir with checkpoints at steps 2 and 4 (different params)."""
  output_dir = tmp_path_factory.mktemp("run")
  config = tiny_config()
  params = init_params(config, jax.random.key(0))
  manager = checkpoints.create_manager(output_dir)
  states = {2: train_state(params),
            # Host numpy arrays, like train.py's un-replicated state.
            4: jax.tree.map(np.asarray, train_state(jax.tree.map(lambda x: x + 1.0, params)))}
  for step, state in states.items():
    checkpoints.save(manager, step, state, config, progress={"step": step})
  manager.wait_until_finished()
  manager.close()
  step_params = {step: state.params for step, state in states.items()}
  return output_dir, config, step_params, states


def step_dir(output_dir, step):
  return checkpoints.checkpoint_dir(output_dir) / str(step)


def test_load_params_restores_config_and_params_only(run):
  output_dir, config, step_params, _ = run
  loaded_config, params = checkpoints.load_params(step_dir(output_dir, 2))
  assert loaded_config == config and loaded_config.extra == config.extra
  assert_trees_equal(params, step_params[2])
  # An output_dir means its latest step.
  _, latest = checkpoints.load_params(output_dir)
  assert_trees_equal(latest, step_params[4])


def test_restore_training_gives_the_full_state_and_progress(run):
  output_dir, _, _, states = run
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), states[4])
  restored, progress = checkpoints.restore_training(step_dir(output_dir, 4), abstract)
  assert progress == {"step": 4}
  assert int(restored.step) == 1
  assert_trees_equal(restored.opt_state, states[4].opt_state)
  assert_trees_equal(restored.params, states[4].params)


def test_export_step_dir_is_bit_exact(run, tmp_path, capsys):
  output_dir, config, step_params, _ = run
  out = tmp_path / "hf"
  assert export.main([str(step_dir(output_dir, 2)), str(out)]) == 0
  assert "step 2" in capsys.readouterr().out
  files = set(os.listdir(out))
  assert MODEL_FILES <= files and {"tokenizer.json", "tokenizer_config.json"} <= files
  assert not [name for name in os.listdir(tmp_path) if name.startswith(".")]  # No staging left.
  loaded_config, params = hf_checkpoint.load_pretrained(str(out))
  assert loaded_config == config
  assert_trees_equal(params, step_params[2])

  generation = transformers.GenerationConfig.from_pretrained(str(out))
  assert (generation.decoder_start_token_id, generation.eos_token_id,
          generation.pad_token_id) == (0, 1, 0)
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
  bundled = transformers.T5Tokenizer.from_pretrained(str(config_lib.BUNDLED_TOKENIZER_DIR))
  assert len(tokenizer) == len(bundled) == BUNDLED_TOKENIZER_SIZE
  text = "summarize: The quick brown fox <extra_id_0> jumps."
  assert tokenizer(text).input_ids == bundled(text).input_ids


def test_export_output_dir_picks_the_latest_step(run, tmp_path, capsys):
  output_dir, _, step_params, _ = run
  out = tmp_path / "hf"
  out.mkdir()  # An empty OUT is fine.
  assert export.main([str(output_dir), str(out)]) == 0
  assert "step 4" in capsys.readouterr().out
  assert_trees_equal(hf_checkpoint.load_pretrained(str(out))[1], step_params[4])
  # So does its checkpoints/ directory.
  assert export.main([str(checkpoints.checkpoint_dir(output_dir)), str(tmp_path / "hf2")]) == 0
  assert_trees_equal(hf_checkpoint.load_pretrained(str(tmp_path / "hf2"))[1], step_params[4])


def test_transformers_loads_the_export(run, tmp_path):
  torch = pytest.importorskip("torch")
  output_dir, _, step_params, _ = run
  out = tmp_path / "hf"
  assert export.main([str(output_dir), str(out)]) == 0
  model, info = transformers.T5ForConditionalGeneration.from_pretrained(
      str(out), output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"]
  assert not info["mismatched_keys"]
  q = step_params[4]["decoder"]["block_1"]["layer_1"]["EncDecAttention"]["q"]["kernel"]
  np.testing.assert_array_equal(
      model.decoder.block[1].layer[1].EncDecAttention.q.weight.detach().numpy(), np.asarray(q).T)
  np.testing.assert_array_equal(model.lm_head.weight.detach().numpy(),
                                np.asarray(step_params[4]["lm_head"]["kernel"]).T)
  assert model.generation_config.decoder_start_token_id == 0
  assert isinstance(model, torch.nn.Module)


def test_tokenizer_choice(run, tmp_path):
  output_dir, *_ = run
  settings = export._tokenizer_settings
  bundled = str(config_lib.BUNDLED_TOKENIZER_DIR)
  assert settings(tmp_path, None)["tokenizer_name"] == bundled
  (tmp_path / "run_config.json").write_text(json.dumps(
      {"tokenizer_name": None, "model_name_or_path": "owner/t5-model", "cache_dir": "c"}))
  assert settings(tmp_path, None) == {"tokenizer_name": None, "config_name": None,
                                      "model_name_or_path": "owner/t5-model",
                                      "cache_dir": "c"}
  (tmp_path / "tokenizer.json").write_text("{}")
  assert settings(tmp_path, None)["tokenizer_name"] == str(tmp_path)
  assert settings(tmp_path, "my/tok")["tokenizer_name"] == "my/tok"

  # --tokenizer_name is used, and checked against the model's vocabulary.
  small = tmp_path / "small_tokenizer"
  transformers.T5Tokenizer.from_pretrained(bundled, extra_ids=0).save_pretrained(str(small))
  out = tmp_path / "hf"
  assert export.main([str(output_dir), str(out), "--tokenizer_name", str(small)]) == 0
  assert len(transformers.AutoTokenizer.from_pretrained(str(out))) == 32000


def test_tokenizer_larger_than_the_vocabulary_is_refused(run, tmp_path, monkeypatch, capsys):
  output_dir, *_ = run
  monkeypatch.setattr(checkpoints, "load_params",
                      lambda path: (T5Config(vocab_size=100, num_layers=1), None))
  assert export.main([str(output_dir), str(tmp_path / "hf")]) == 2
  assert "the tokenizer has 32100 tokens but the model only 100" in capsys.readouterr().err
  assert not (tmp_path / "hf").exists()


def error_of(argv, capsys) -> str:
  assert export.main([str(arg) for arg in argv]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1, err
  return err


def test_errors(run, tmp_path, capsys):
  output_dir, *_ = run
  assert "no checkpoint at" in error_of([tmp_path / "missing", tmp_path / "out"], capsys)
  assert "no checkpoint in" in error_of([tmp_path, tmp_path / "out"], capsys)
  assert "required: OUT" in error_of([output_dir], capsys)
  assert "unrecognized arguments: --bogus" in error_of([output_dir, tmp_path / "o", "--bogus"],
                                                        capsys)
  (tmp_path / "file").write_text("x")
  assert "is a file" in error_of([output_dir, tmp_path / "file"], capsys)
  assert "inside the checkpoints directory" in error_of(
      [output_dir, checkpoints.checkpoint_dir(output_dir) / "hf"], capsys)

  # A step directory without the model config (written by an older flax-sum).
  old = tmp_path / "old"
  manager = checkpoints.create_manager(old)
  manager.save(1, args=checkpoints.ocp.args.StandardSave({"params": {"x": np.zeros(2)}}))
  manager.wait_until_finished()
  manager.close()
  assert "written by an older flax-sum" in error_of([old, tmp_path / "out"], capsys)


def test_non_empty_out_needs_overwrite(run, tmp_path, capsys):
  output_dir, _, step_params, _ = run
  out = tmp_path / "hf"
  out.mkdir()
  (out / "notes.txt").write_text("mine")
  (out / "model.safetensors").write_bytes(b"old model")
  (out / "pytorch_model.bin").write_bytes(b"stale")
  assert "is not empty: pass --overwrite" in error_of([output_dir, out], capsys)
  assert (out / "model.safetensors").read_bytes() == b"old model"

  assert export.main([str(output_dir), str(out), "--overwrite"]) == 0
  # Model files are replaced, stale ones removed, the user's other files kept.
  assert set(os.listdir(out)) == MODEL_FILES | {"tokenizer.json", "tokenizer_config.json",
                                                "notes.txt"}
  assert_trees_equal(hf_checkpoint.load_pretrained(str(out))[1], step_params[4])


def test_failed_export_keeps_the_previous_model(run, tmp_path, monkeypatch):
  output_dir, *_ = run
  out = tmp_path / "hf"
  assert export.main([str(step_dir(output_dir, 2)), str(out)]) == 0
  before = {name: (out / name).read_bytes() for name in os.listdir(out)}

  helpers.make_safetensors_fail(monkeypatch)
  with pytest.raises(OSError, match="disk full"):
    export.main([str(output_dir), str(out), "--overwrite"])
  assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before
  assert sorted(os.listdir(tmp_path)) == ["hf"]  # The staging directory is gone.


def test_module_entry_point(tmp_path):
  result = subprocess.run([sys.executable, "-m", "flax_sum.export", str(tmp_path / "missing"),
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
  assert result.returncode == 2
  assert result.stderr.startswith("error: no checkpoint at") and "Traceback" not in result.stderr
  with pytest.raises(SystemExit) as exit_info:
    export.main(["-h"])
  assert exit_info.value.code == 0

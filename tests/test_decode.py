"""Cached greedy decoding must equal recomputing the whole decoder for every new token."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from flax_sum.decode import (GenerationSettings, first_argmax, greedy_generate, greedy_search,
                             reorder_beam_ancestry, top_k)
from flax_sum.model import T5, T5Config, init_decode_cache, init_params

BATCH, SOURCE_LENGTH, MAX_LENGTH, VOCAB = 16, 9, 14, 64


def tiny_config(feed_forward_proj: str, tied: bool) -> T5Config:
  return helpers.tiny_t5_config(feed_forward_proj, tied, vocab_size=VOCAB, d_model=32, d_kv=8,
                                d_ff=48)


def inputs():
  return helpers.padded_source_batch(BATCH, SOURCE_LENGTH, VOCAB, seed=0)


def uncached_greedy(model: T5, params, input_ids, mask) -> np.ndarray:
  """Argmax of a full teacher-forced decoder pass per step, never stopping at EOS."""
  logits_fn = jax.jit(lambda decoder_ids: model.apply({"params": params}, input_ids, mask,
                                                      decoder_ids))
  decoder_ids = np.full((BATCH, MAX_LENGTH), model.config.pad_token_id, np.int32)
  decoder_ids[:, 0] = model.config.decoder_start_token_id
  tokens = np.zeros((BATCH, MAX_LENGTH), np.int32)
  for step in range(MAX_LENGTH):
    tokens[:, step] = np.argmax(logits_fn(decoder_ids)[:, step], axis=-1)
    if step + 1 < MAX_LENGTH:
      decoder_ids[:, step + 1] = tokens[:, step]
  return tokens


def cut_after_eos(tokens: np.ndarray, eos: int, pad: int) -> np.ndarray:
  tokens = tokens.copy()
  for row in tokens:
    hits = np.flatnonzero(row == eos)
    if hits.size:
      row[hits[0] + 1:] = pad
  return tokens


def pick_eos(tokens: np.ndarray) -> int:
  """A token that ends some rows early and never appears in others."""
  best, best_score = None, 0
  for token in range(2, VOCAB):
    first = [np.flatnonzero(row == token) for row in tokens]
    early = sum(1 for hits in first if hits.size and hits[0] < MAX_LENGTH - 3)
    absent = sum(1 for hits in first if not hits.size)
    if early and absent and min(early, absent) > best_score:
      best, best_score = token, min(early, absent)
  assert best is not None, "no token ends some rows early; change the seed"
  return best


@pytest.fixture(scope="module", params=[("relu", True), ("gated-gelu", False)],
                ids=["relu-tied", "gated-gelu-untied"])
def setup(request):
  config = tiny_config(*request.param)
  params = init_params(config, jax.random.key(3))
  input_ids, mask = inputs()
  raw = uncached_greedy(T5(config), params, input_ids, mask)
  eos = pick_eos(raw)
  model = T5(dataclasses.replace(config, eos_token_id=eos))
  return model, params, input_ids, mask, cut_after_eos(raw, eos, config.pad_token_id)


def test_cached_equals_uncached_under_jit(setup):
  model, params, input_ids, mask, expected = setup
  generate = jax.jit(lambda p, i, m: greedy_generate(model, p, i, m, MAX_LENGTH))
  tokens = np.asarray(generate(params, input_ids, mask))
  assert tokens.dtype == np.int32 and tokens.shape == (BATCH, MAX_LENGTH)
  eos = model.config.eos_token_id
  finished_early = [(row == eos).any() and np.flatnonzero(row == eos)[0] < MAX_LENGTH - 3
                    for row in expected]
  assert any(finished_early) and not all(finished_early)
  np.testing.assert_array_equal(tokens, expected)


def test_cached_equals_uncached_under_pmap(setup):
  model, params, input_ids, mask, expected = setup
  devices = jax.local_device_count()
  assert devices == 8
  replicated = jax.tree.map(lambda x: np.broadcast_to(x, (devices,) + x.shape), params)
  shard = lambda x: x.reshape((devices, BATCH // devices) + x.shape[1:])
  generate = jax.pmap(lambda p, i, m: greedy_generate(model, p, i, m, MAX_LENGTH))
  tokens = np.asarray(generate(replicated, shard(input_ids), shard(mask)))
  np.testing.assert_array_equal(tokens.reshape(BATCH, MAX_LENGTH), expected)


@pytest.mark.parametrize("dtype,atol", [(jnp.float32, 2e-5), (jnp.bfloat16, 0.15)])
def test_cached_steps_equal_full_pass_logits(setup, dtype, atol):
  model, params, input_ids, mask, expected = setup
  model = T5(dataclasses.replace(model.config, dtype=dtype))
  start = np.full((BATCH, 1), model.config.decoder_start_token_id, np.int32)
  decoder_ids = np.concatenate([start, expected[:, :-1]], axis=1)

  @jax.jit
  def full_and_stepwise(params):
    variables = {"params": params}
    encoded = model.apply(variables, input_ids, mask, method=T5.encode)
    full = model.apply(variables, encoded, mask, decoder_ids, method=T5.decode)
    cache = init_decode_cache(model, params, encoded, mask, MAX_LENGTH)

    def step(cache, tokens):
      logits, updated = model.apply({"params": params, "cache": cache}, encoded, mask,
                                    tokens[:, None], decode=True, mutable=["cache"],
                                    method=T5.decode)
      return updated["cache"], logits[:, 0]

    cache, stepwise = jax.lax.scan(step, cache, decoder_ids.T)
    return full, jnp.swapaxes(stepwise, 0, 1), cache

  full, stepwise, cache = full_and_stepwise(params)
  assert stepwise.dtype == jnp.float32
  np.testing.assert_allclose(stepwise, full, atol=atol, rtol=0)
  index = cache["decoder"]["block_1"]["layer_0"]["SelfAttention"]["cache_index"]
  assert int(index) == MAX_LENGTH



BEAMS = 3


def stepwise_beam_logits(model, params, input_ids, mask, beam_ids, reorder_at=None,
                         reorder_indices=None):
  """Decodes `beam_ids` [BATCH * BEAMS, MAX_LENGTH] (input b's beams at rows b * BEAMS + j)
  one token per call with the beam-shared cache; before step `reorder_at`, the beams are
  reordered by `reorder_indices` as beam search does. Returns (logits, final cache)."""
  @jax.jit
  def run(params):
    encoded = model.apply({"params": params}, input_ids, mask, method=T5.encode)
    cache = init_decode_cache(model, params, encoded, mask, MAX_LENGTH, rows_per_input=BEAMS)
    logits = []
    for step in range(MAX_LENGTH):
      if step == reorder_at:
        cache = reorder_beam_ancestry(cache, jnp.asarray(reorder_indices))
      out, updated = model.apply({"params": params, "cache": cache}, encoded, mask,
                                 jnp.asarray(beam_ids[:, step:step + 1]), decode=True,
                                 mutable=["cache"], method=T5.decode)
      cache = updated["cache"]
      logits.append(out[:, 0])
    return jnp.stack(logits, axis=1), cache
  return run(params)


def full_pass_logits(model, params, input_ids, mask, decoder_ids):
  """Teacher-forced logits of every row of `decoder_ids`, each row's input repeated per beam."""
  repeat = lambda x: np.repeat(np.asarray(x), BEAMS, axis=0)
  return model.apply({"params": params}, repeat(input_ids), repeat(mask), decoder_ids)


def beam_sequences():
  """BEAMS different decoder inputs per source row: the start token, then random tokens."""
  ids = np.random.default_rng(5).integers(2, VOCAB, (BATCH * BEAMS, MAX_LENGTH)).astype(np.int32)
  ids[:, 0] = 0
  return ids


def test_beams_sharing_a_cache_see_only_their_own_tokens(setup):
  model, params, input_ids, mask, _ = setup
  beam_ids = beam_sequences()
  stepwise, cache = stepwise_beam_logits(model, params, input_ids, mask, beam_ids)
  full = full_pass_logits(model, params, input_ids, mask, beam_ids)
  np.testing.assert_allclose(stepwise, full, atol=2e-5, rtol=0)
  attention = cache["decoder"]["block_0"]["layer_0"]["SelfAttention"]
  # One key/value slot per beam and position, stored per input: [inputs, heads, d_kv, slots].
  config = model.config
  assert attention["cached_key"].shape == (BATCH, config.num_heads, config.d_kv,
                                           MAX_LENGTH * BEAMS)
  np.testing.assert_array_equal(attention["cache_ancestry"],
                                np.tile(np.arange(BEAMS), BATCH)[:, None].repeat(MAX_LENGTH, 1))


def test_reordered_beams_continue_the_histories_they_were_given(setup):
  model, params, input_ids, mask, _ = setup
  beam_ids = beam_sequences()
  reorder_at = 5
  # Input b's beam j continues beam source[j] (beams may be duplicated or dropped).
  source = np.array([2, 2, 0])
  indices = (np.arange(BATCH)[:, None] * BEAMS + source[None, :]).reshape(-1)
  stepwise, cache = stepwise_beam_logits(model, params, input_ids, mask, beam_ids, reorder_at,
                                         indices)
  # What each row has seen: its source beam's tokens before the reorder, its own after.
  histories = beam_ids.copy()
  histories[:, :reorder_at] = beam_ids[indices, :reorder_at]
  full = full_pass_logits(model, params, input_ids, mask, histories)
  np.testing.assert_allclose(stepwise[:, reorder_at:], full[:, reorder_at:], atol=2e-5, rtol=0)
  attention = cache["decoder"]["block_1"]["layer_0"]["SelfAttention"]
  ancestry = np.asarray(attention["cache_ancestry"]).reshape(BATCH, BEAMS, MAX_LENGTH)
  np.testing.assert_array_equal(ancestry[:, :, :reorder_at],
                                np.broadcast_to(source[None, :, None], (BATCH, BEAMS, reorder_at)))
  np.testing.assert_array_equal(ancestry[:, :, reorder_at:],
                                np.broadcast_to(np.arange(BEAMS)[None, :, None],
                                                (BATCH, BEAMS, MAX_LENGTH - reorder_at)))


def test_reorder_moves_only_the_ancestry_tables():
  cache = {"SelfAttention": {"cached_key": jnp.arange(24.0).reshape(2, 12),
                             "cache_ancestry": jnp.array([[0, 0], [1, 1], [0, 1], [1, 0]]),
                             "cache_index": jnp.array(2)},
           "EncDecAttention": {"cached_key": jnp.arange(8.0).reshape(2, 4)}}
  moved = reorder_beam_ancestry(cache, jnp.array([1, 1, 3, 2]))
  np.testing.assert_array_equal(moved["SelfAttention"]["cache_ancestry"],
                                [[1, 1], [1, 1], [1, 0], [0, 1]])
  for path in (("SelfAttention", "cached_key"), ("SelfAttention", "cache_index"),
               ("EncDecAttention", "cached_key")):
    np.testing.assert_array_equal(moved[path[0]][path[1]], cache[path[0]][path[1]])

def test_greedy_search_stops_when_all_rows_end():
  eos, pad, vocab, calls = 1, 0, 8, []

  def tokens_to_logits(tokens, step):
    jax.debug.callback(lambda: calls.append(1))
    # Row r emits token 2 + step until step r, where it emits EOS.
    rows = jnp.arange(3)
    next_tokens = jnp.where(rows == step, eos, 2 + step)
    return jax.nn.one_hot(next_tokens, vocab) + 0 * tokens, step + 1

  settings = GenerationSettings(max_new_tokens=10, eos_token_id=eos, pad_token_id=pad)
  search = jax.jit(lambda: greedy_search(tokens_to_logits, jnp.array(0), 3, settings))
  tokens = np.asarray(search())
  np.testing.assert_array_equal(tokens, [[1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                                         [2, 1, 0, 0, 0, 0, 0, 0, 0, 0],
                                         [2, 3, 1, 0, 0, 0, 0, 0, 0, 0]])
  assert len(calls) == 3


def test_first_argmax_matches_argmax_with_ties_and_infinities():
  scores = np.array(jax.random.normal(jax.random.key(0), (6, 1000)))
  scores[1, [7, 9]] = 50.0  # A tie: the first index wins, as in jnp.argmax.
  scores[2, 3] = np.inf
  scores[3, :] = -np.inf
  scores[4, -1] = 60.0
  expected = np.argmax(scores, axis=-1)
  np.testing.assert_array_equal(jax.jit(first_argmax)(scores), expected)
  assert expected[1] == 7 and expected[3] == 0 and expected[4] == 999


@pytest.mark.parametrize("n,k,block_size", [(4 * 1000, 8, 64), (1003, 6, 16), (50, 4, 16),
                                            (300, 5, 256)])
def test_top_k_by_blocks_equals_lax_top_k_with_ties(n, k, block_size):
  rng = np.random.default_rng(n)
  scores = rng.integers(-6, 4, (7, n)).astype(np.float32)  # Many ties.
  scores[0] = -np.inf  # Every score ties, the padding too.
  scores[1, :n - 3] = -np.inf  # Fewer finite scores than k.
  scores[2, [5, n - 1]] = 100.0  # A tie between the first and the last block.
  scores[3] = rng.standard_normal(n)
  values, indices = jax.jit(lambda x: top_k(x, k, block_size))(scores)
  expected_values, expected_indices = jax.lax.top_k(scores, k)
  np.testing.assert_array_equal(indices, expected_indices)
  np.testing.assert_array_equal(values, expected_values)
  assert indices.dtype == expected_indices.dtype

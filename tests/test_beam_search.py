"""Beam search and the generation settings: cached decoding equals an uncached reference that
recomputes the whole decoder every step; logits processors and early exit on constructed models."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import helpers
from flax_sum import decode
from flax_sum.decode import GenerationSettings, beam_search, generate, greedy_search
from flax_sum.errors import UserError
from flax_sum.model import T5, T5Config, init_params

BATCH, SOURCE_LENGTH, MAX_NEW_TOKENS, VOCAB = 16, 9, 12, 48


def tiny_config(feed_forward_proj: str, tied: bool) -> T5Config:
  return helpers.tiny_t5_config(feed_forward_proj, tied, vocab_size=VOCAB, d_model=16, d_kv=4,
                                d_ff=24)


def inputs():
  return helpers.padded_source_batch(BATCH, SOURCE_LENGTH, VOCAB, seed=1)


def ban_ngrams_reference(scores: np.ndarray, tokens: list[int], n: int) -> None:
  """Hugging Face's no_repeat_ngram_size on one sequence (start token included), in place."""
  if n <= 0 or len(tokens) < n:
    return
  prefix = tuple(tokens[len(tokens) - n + 1:])
  for p in range(len(tokens) - n + 1):
    if tuple(tokens[p:p + n - 1]) == prefix:
      scores[tokens[p + n - 1]] = -np.inf


def process_reference(scores: np.ndarray, tokens: list[int], s: GenerationSettings) -> np.ndarray:
  scores = scores.copy()
  if len(tokens) < s.min_length:
    scores[s.eos_token_id] = -np.inf
  ban_ngrams_reference(scores, tokens, s.no_repeat_ngram_size)
  return scores


def log_softmax(x: np.ndarray) -> np.ndarray:
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def uncached_beam_search(next_logits, batch: int, s: GenerationSettings) -> np.ndarray:
  """A per-row list-of-hypotheses beam search; next_logits(rows x sequences) -> logits."""
  nb, length = s.num_beams, s.max_new_tokens + 1
  running = [[[s.decoder_start_token_id] for _ in range(nb)] for _ in range(batch)]
  running_scores = np.full((batch, nb), -1e9, np.float32)
  running_scores[:, 0] = 0
  hyps = [[] for _ in range(batch)]  # (score, tokens)
  done = [False] * batch
  for cur_len in range(1, length):
    flat = [seq for row in running for seq in row]
    ids = np.full((len(flat), length), s.pad_token_id, np.int32)
    for i, seq in enumerate(flat):
      ids[i, :len(seq)] = seq
    logits = np.asarray(next_logits(ids, cur_len), np.float32)
    for b in range(batch):
      if done[b]:
        continue
      log_probs = np.stack([process_reference(log_softmax(logits[b * nb + i]), running[b][i], s)
                            for i in range(nb)]) + running_scores[b][:, None]
      flat_scores = log_probs.reshape(-1)
      order = np.argsort(-flat_scores, kind="stable")[:2 * nb]
      new_running, new_scores = [], []
      for rank, index in enumerate(order):
        beam, token = divmod(int(index), logits.shape[-1])
        seq = running[b][beam] + [token]
        if token == s.eos_token_id or cur_len + 1 >= length:
          if rank < nb:
            hyps[b].append((flat_scores[index] / cur_len ** s.length_penalty, seq))
            hyps[b] = sorted(hyps[b], key=lambda h: -h[0])[:nb]
        elif len(new_running) < nb:
          new_running.append(seq)
          new_scores.append(flat_scores[index])
      while len(new_running) < nb:  # Only at the last step: nothing continues.
        new_running.append(running[b][0] + [s.pad_token_id])
        new_scores.append(-2e9)
      running[b], running_scores[b] = new_running, new_scores
      if len(hyps[b]) == nb:
        if s.early_stopping:
          done[b] = True
        elif new_scores[0] / cur_len ** s.length_penalty <= hyps[b][-1][0]:
          done[b] = True
    if all(done):
      break
  out = np.full((batch, s.max_new_tokens), s.pad_token_id, np.int32)
  for b in range(batch):
    best = hyps[b][0][1][1:]
    out[b, :len(best)] = best
  return out


def uncached_greedy(next_logits, batch: int, s: GenerationSettings) -> np.ndarray:
  length = s.max_new_tokens + 1
  ids = np.full((batch, length), s.pad_token_id, np.int32)
  ids[:, 0] = s.decoder_start_token_id
  finished = np.zeros(batch, bool)
  for cur_len in range(1, length):
    logits = np.asarray(next_logits(ids, cur_len))
    for b in range(batch):
      if not finished[b]:
        scores = process_reference(logits[b], list(ids[b, :cur_len]), s)
        ids[b, cur_len] = np.argmax(scores)
        finished[b] = ids[b, cur_len] == s.eos_token_id
    if finished.all():
      break
  return ids[:, 1:]


def model_next_logits(model: T5, params, input_ids, mask, nb: int):
  input_ids, mask = np.repeat(input_ids, nb, axis=0), np.repeat(mask, nb, axis=0)
  full = jax.jit(lambda ids: model.apply({"params": params}, input_ids, mask, ids))
  return lambda ids, cur_len: np.asarray(full(ids))[:, cur_len - 1]


@pytest.fixture(scope="module", params=[("relu", True), ("gated-gelu", False)],
                ids=["relu-tied", "gated-gelu-untied"])
def setup(request):
  config = tiny_config(*request.param)
  params = init_params(config, jax.random.key(7))
  input_ids, mask = inputs()
  # An EOS that the model emits often enough for hypotheses to end at different steps.
  greedy = uncached_greedy(model_next_logits(T5(config), params, input_ids, mask, 1), BATCH,
                           GenerationSettings(max_new_tokens=MAX_NEW_TOKENS, eos_token_id=-1))
  counts = np.bincount(greedy.reshape(-1), minlength=VOCAB)
  counts[config.pad_token_id] = 0
  eos = int(np.argmax(counts))
  model = T5(dataclasses.replace(config, eos_token_id=eos))
  return model, params, input_ids, mask


SETTINGS = {
    "greedy-ngram2-min4": dict(num_beams=1, no_repeat_ngram_size=2, min_length=4),
    "beam3-lp2-ngram3-min3-early": dict(num_beams=3, length_penalty=2.0, no_repeat_ngram_size=3,
                                        min_length=3, early_stopping=True),
    "beam4-lp0.6-ngram2": dict(num_beams=4, length_penalty=0.6, no_repeat_ngram_size=2),
    "beam2-plain": dict(num_beams=2),
}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_cached_equals_uncached_jit_and_pmap(setup, name):
  model, params, input_ids, mask = setup
  settings = dataclasses.replace(GenerationSettings.greedy(model.config, MAX_NEW_TOKENS),
                                 **SETTINGS[name])
  next_logits = model_next_logits(model, params, input_ids, mask, settings.num_beams)
  reference = (uncached_beam_search if settings.num_beams > 1 else uncached_greedy)
  expected = reference(next_logits, BATCH, settings)
  eos_at = [np.flatnonzero(row == settings.eos_token_id) for row in expected]
  assert any(hits.size and hits[0] < MAX_NEW_TOKENS - 2 for hits in eos_at)

  tokens = jax.jit(lambda p, i, m: generate(model, p, i, m, settings))(params, input_ids, mask)
  assert tokens.dtype == jnp.int32 and tokens.shape == (BATCH, MAX_NEW_TOKENS)
  np.testing.assert_array_equal(np.asarray(tokens), expected)

  devices = jax.local_device_count()
  replicated = jax.tree.map(lambda x: np.broadcast_to(x, (devices,) + x.shape), params)
  shard = lambda x: x.reshape((devices, BATCH // devices) + x.shape[1:])
  tokens = jax.pmap(lambda p, i, m: generate(model, p, i, m, settings))(
      replicated, shard(input_ids), shard(mask))
  np.testing.assert_array_equal(np.asarray(tokens).reshape(BATCH, -1), expected)


def markov(table: np.ndarray):
  """A constructed model: the next-token logits depend only on the last token."""
  table = jnp.asarray(table, jnp.float32)
  calls = []

  def tokens_to_logits(tokens, cache):
    jax.debug.callback(lambda: calls.append(1))
    return table[tokens[:, 0]], cache + 1

  return tokens_to_logits, calls


def test_no_repeat_ngram_and_min_length_exact():
  vocab, eos = 10, 1
  preference = np.array([0, 9, 8, 7, 6, 5, 4, 3, 2, 1], np.float32)  # eos best, then 2, 3, ...
  logits, _ = markov(np.tile(preference, (vocab, 1)))
  base = GenerationSettings(max_new_tokens=8, eos_token_id=eos, pad_token_id=0)
  run = lambda **kw: np.asarray(jax.jit(lambda: greedy_search(
      logits, jnp.array(0), 1, dataclasses.replace(base, **kw)))())[0].tolist()
  assert run() == [1, 0, 0, 0, 0, 0, 0, 0]
  # EOS is banned while 1 + generated < min_length: the 4th token may be EOS.
  assert run(min_length=4) == [2, 2, 2, 1, 0, 0, 0, 0]
  no_eos = np.tile(preference, (vocab, 1))
  no_eos[:, eos] = -100
  logits, _ = markov(no_eos)
  run = lambda **kw: np.asarray(jax.jit(lambda: greedy_search(
      logits, jnp.array(0), 1, dataclasses.replace(base, **kw)))())[0].tolist()
  assert run() == [2] * 8
  # Start token 0 counts: bigrams (0,2), (2,2) then 2 is banned after 2, and so on.
  assert run(no_repeat_ngram_size=2) == [2, 2, 3, 2, 4, 2, 5, 2]
  assert run(no_repeat_ngram_size=1) == [2, 3, 4, 5, 6, 7, 8, 9]
  assert run(no_repeat_ngram_size=3) == [2, 2, 2, 3, 2, 2, 4, 2]


@pytest.mark.parametrize("early_stopping,expected_calls", [(True, 3), (False, 5)])
def test_beam_search_picks_the_better_path_and_exits_early(early_stopping, expected_calls):
  # Start: 2 (p .6) or 3 (.4); after 3: EOS (.99); after 2: 4 (.55) or EOS; after 4: 5 (.9) or
  # EOS; after 5: 5 (.6) or EOS. Greedy takes 2; the beams finish [3, EOS] first, then
  # [2, 4, EOS]: with early_stopping two finished hypotheses end the search (3 steps); without,
  # it goes on until no running beam can beat the worst finished one (5 steps, length_penalty 0).
  vocab, eos = 6, 1
  probs = np.full((vocab, vocab), 1e-6)
  probs[0, [2, 3]] = .6, .4
  probs[3, eos] = .99
  probs[2, [4, eos]] = .55, .45
  probs[4, [5, eos]] = .9, .1
  probs[5, [5, eos]] = .6, .4
  table = np.log(probs).astype(np.float32)
  logits, calls = markov(table)
  settings = GenerationSettings(max_new_tokens=10, num_beams=2, eos_token_id=eos,
                                length_penalty=0.0, early_stopping=early_stopping)
  tokens = np.asarray(jax.jit(lambda: beam_search(logits, jnp.array(0), 1, settings))())
  assert tokens.tolist() == [[3, 1] + [0] * 8]
  assert len(calls) == expected_calls
  reference = uncached_beam_search(lambda ids, cur_len: table[ids[:, cur_len - 1]], 1, settings)
  np.testing.assert_array_equal(tokens, reference)
  greedy = np.asarray(jax.jit(lambda: greedy_search(
      logits, jnp.array(0), 1, dataclasses.replace(settings, num_beams=1)))())
  assert greedy[0].tolist() == [2, 4, 5, 5, 5, 5, 5, 5, 5, 5]


def test_resolve_precedence():
  model_config = T5Config(vocab_size=32, d_model=8, d_kv=2, d_ff=8, num_layers=1, num_heads=2,
                          extra={"task_specific_params": {"summarization": {
                              "early_stopping": True, "length_penalty": 2.0, "max_length": 200,
                              "min_length": 30, "no_repeat_ngram_size": 3, "num_beams": 4}}})
  config = ml_collections.ConfigDict({"num_beams": None, "val_max_target_length": None})
  s = decode.resolve(config, model_config)
  assert s == GenerationSettings(max_new_tokens=199, num_beams=4, min_length=30,
                                 length_penalty=2.0, early_stopping=True, no_repeat_ngram_size=3)
  s = decode.resolve({"num_beams": 2, "val_max_target_length": 64}, model_config,
                     {"length_penalty": 0.5, "eos_token_id": [5, 6]})
  assert (s.num_beams, s.max_new_tokens, s.length_penalty, s.eos_token_id) == (2, 63, 0.5, 5)
  assert decode.resolve({"max_new_tokens": 7, "generation_max_length": 3},
                        model_config).max_new_tokens == 7
  plain = decode.resolve({}, T5Config(vocab_size=32, d_model=8, d_kv=2, d_ff=8, num_layers=1,
                                      num_heads=2))
  assert plain == GenerationSettings(max_new_tokens=19)
  with pytest.raises(UserError, match="val_max_target_length leaves no token"):
    decode.resolve({"val_max_target_length": 1}, model_config)

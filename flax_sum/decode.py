"""Generation with a KV cache: greedy search written over a model-independent callback."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from flax_sum import model as model_lib

Array = jax.Array
Cache = Any
# (last tokens [batch, 1], cache) -> (next-token logits [batch, vocab], updated cache)
TokensToLogits = Callable[[Array, Cache], tuple[Array, Cache]]


def greedy_search(tokens_to_logits: TokensToLogits, cache: Cache, batch_size: int,
                  max_length: int, start_token_id: int, eos_token_id: int,
                  pad_token_id: int) -> Array:
  """Argmax decoding of up to `max_length` tokens per row, stopping once every row has EOS.

  Returns int32 [batch, max_length]: the tokens after the start token; a row's EOS is kept and
  everything after it is `pad_token_id`.
  """
  sequences = jnp.full((batch_size, max_length), pad_token_id, dtype=jnp.int32)
  last_tokens = jnp.full((batch_size, 1), start_token_id, dtype=jnp.int32)
  finished = jnp.zeros((batch_size,), dtype=bool)

  def not_done(state):
    step, _, _, _, finished = state
    return (step < max_length) & ~jnp.all(finished)

  def decode_step(state):
    step, last_tokens, cache, sequences, finished = state
    logits, cache = tokens_to_logits(last_tokens, cache)
    next_tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    next_tokens = jnp.where(finished, pad_token_id, next_tokens)
    sequences = jax.lax.dynamic_update_slice(sequences, next_tokens[:, None], (0, step))
    finished = finished | (next_tokens == eos_token_id)
    return step + 1, next_tokens[:, None], cache, sequences, finished

  state = (jnp.array(0, jnp.int32), last_tokens, cache, sequences, finished)
  _, _, _, sequences, _ = jax.lax.while_loop(not_done, decode_step, state)
  return sequences


def greedy_generate(model: model_lib.T5, params: Any, input_ids: Array, attention_mask: Array,
                    max_length: int) -> Array:
  """Greedy summaries int32 [batch, max_length] (tokens after the decoder start token).

  Encodes once, then decodes one token per step with the KV cache. Pure: call it inside
  `jax.jit` or `jax.pmap` (with params replicated).
  """
  cfg = model.config
  variables = {"params": params}
  encoded = model.apply(variables, input_ids, attention_mask, method=model_lib.T5.encode)
  cache = model_lib.init_decode_cache(model, params, encoded, attention_mask, max_length)

  def tokens_to_logits(tokens: Array, cache: Cache) -> tuple[Array, Cache]:
    logits, updated = model.apply({"params": params, "cache": cache}, encoded, attention_mask,
                                  tokens, decode=True, mutable=["cache"],
                                  method=model_lib.T5.decode)
    return logits[:, -1], updated["cache"]

  return greedy_search(tokens_to_logits, cache, input_ids.shape[0], max_length,
                       start_token_id=cfg.decoder_start_token_id, eos_token_id=cfg.eos_token_id,
                       pad_token_id=cfg.pad_token_id)

"""Pure train, eval and generate steps, written per device and `jax.pmap`-ed over `AXIS`.

Every step returns *sums* with explicit denominators (psum-ed over devices), so a metric is the
same whatever the batch size or device count: the caller adds the sums up and divides once.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import jax_utils
from flax.training import train_state

from flax_sum import decode

AXIS = "batch"

Batch = dict[str, jax.Array]


class TrainState(train_state.TrainState):
  """Params, optimizer state and step; `apply_fn` is the T5 module's apply.

  With bfloat16 params (`create(..., param_dtype=jnp.bfloat16)`), `params` are what the model
  computes with and `master_params` the float32 weights the optimizer updates; every update
  rounds the new master weights to bfloat16 params. With float32 params, `master_params` is
  None and `params` are updated directly.
  """
  master_params: Any = None

  @classmethod
  def create(cls, *, apply_fn, params, tx, param_dtype=jnp.float32, **kwargs):
    param_dtype = jnp.dtype(param_dtype)
    master = jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params)
    if param_dtype == jnp.float32:
      return super().create(apply_fn=apply_fn, params=master, tx=tx, **kwargs)
    return cls(step=0, apply_fn=apply_fn, params=_cast(master, param_dtype), tx=tx,
               opt_state=tx.init(master), master_params=master, **kwargs)

  def apply_gradients(self, *, grads, **kwargs):
    if self.master_params is None:
      return super().apply_gradients(grads=grads, **kwargs)
    grads = _cast(grads, jnp.float32)
    updates, opt_state = self.tx.update(grads, self.opt_state, self.master_params)
    master = optax.apply_updates(self.master_params, updates)
    param_dtype = jax.tree.leaves(self.params)[0].dtype
    return self.replace(step=self.step + 1, params=_cast(master, param_dtype),
                        master_params=master, opt_state=opt_state, **kwargs)

  def float32_params(self):
    """The weights at full precision: what is exported and checkpointed for inference."""
    return self.params if self.master_params is None else self.master_params


def _cast(tree, dtype):
  return jax.tree.map(lambda x: x.astype(dtype), tree)


def cross_entropy_sums(logits: jax.Array, labels: jax.Array, weights: jax.Array,
                       label_smoothing: float = 0.0) -> tuple[jax.Array, jax.Array]:
  """Summed token cross-entropy and the summed weights (the token count) it is divided by.

  Label smoothing follows the Hugging Face Trainer: (1 - eps) * nll + eps * mean over the
  vocabulary of -log p, so losses are comparable with `run_summarization.py`'s.
  """
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]
  if label_smoothing:
    nll = (1.0 - label_smoothing) * nll - label_smoothing * log_probs.mean(axis=-1)
  weights = weights.astype(jnp.float32)
  return (nll * weights).sum(), weights.sum()


def correct_token_sum(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> jax.Array:
  return ((logits.argmax(-1) == labels) * weights.astype(jnp.float32)).sum()


def _forward(apply_fn, params, batch: Batch, *, deterministic: bool, rngs=None) -> jax.Array:
  return apply_fn({"params": params}, batch["input_ids"], batch["attention_mask"],
                  batch["decoder_input_ids"], batch["decoder_attention_mask"],
                  deterministic=deterministic, rngs=rngs)


def train_step(state: TrainState, batch: Batch, dropout_rng: jax.Array, *,
               learning_rate_fn: optax.Schedule, label_smoothing: float = 0.0,
               accumulation_steps: int = 1) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer update on this device's `accumulation_steps` micro-batches.

  The loss is the token-weighted mean over the whole update (all micro-batches on all devices):
  each device differentiates its share `loss_sum / global_tokens` and the shares are psum-ed,
  which is the exact gradient of that mean however the tokens fall across devices.
  """
  rng = jax.random.fold_in(jax.random.fold_in(dropout_rng, state.step), jax.lax.axis_index(AXIS))
  global_tokens = jax.lax.psum(batch["decoder_attention_mask"].sum().astype(jnp.float32), AXIS)

  def micro_step(micro_batch, micro_rng):
    def loss_fn(params):
      logits = _forward(state.apply_fn, params, micro_batch, deterministic=False,
                        rngs={"dropout": micro_rng})
      loss_sum, _ = cross_entropy_sums(
          logits, micro_batch["labels"], micro_batch["decoder_attention_mask"], label_smoothing)
      return loss_sum / global_tokens, loss_sum
    grads, loss_sum = jax.grad(loss_fn, has_aux=True)(state.params)
    return grads, loss_sum

  if accumulation_steps == 1:
    grads, loss_sum = micro_step(batch, rng)
  else:
    micro_batches = jax.tree.map(
        lambda x: x.reshape(accumulation_steps, -1, *x.shape[1:]), batch)

    def accumulate(carry, inputs):
      index, micro_batch = inputs
      grads, loss_sum = micro_step(micro_batch, jax.random.fold_in(rng, index))
      grads = _cast(grads, jnp.float32)
      return jax.tree.map(jnp.add, carry, (grads, loss_sum)), None

    # Summed in float32 whatever the params' dtype.
    zeros = (jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params),
             jnp.zeros((), jnp.float32))
    (grads, loss_sum), _ = jax.lax.scan(
        accumulate, zeros, (jnp.arange(accumulation_steps), micro_batches))

  if jax.lax.axis_size(AXIS) > 1:  # Over one device, XLA's CPU all-reduce only copies them.
    grads = jax.lax.psum(grads, AXIS)
  metrics = {
      "loss": jax.lax.psum(loss_sum, AXIS),
      "denominator": global_tokens,
      "grad_norm": optax.tree.norm(_cast(grads, jnp.float32)),
      "learning_rate": learning_rate_fn(state.step),
  }
  return state.apply_gradients(grads=grads), metrics


def eval_step(params, batch: Batch, *, apply_fn: Callable[..., Any]) -> dict[str, jax.Array]:
  """Summed loss, correct tokens and token count; padding rows have zero weight."""
  logits = _forward(apply_fn, params, batch, deterministic=True)
  weights = batch["decoder_attention_mask"]
  loss_sum, token_sum = cross_entropy_sums(logits, batch["labels"], weights)
  sums = {"loss": loss_sum, "accuracy": correct_token_sum(logits, batch["labels"], weights),
          "denominator": token_sum}
  return jax.lax.psum(sums, AXIS)


def generate_step(params, batch: Batch, *, model,
                  settings: decode.GenerationSettings) -> jax.Array:
  """Summaries [per_device_batch, settings.max_new_tokens] for this device's rows."""
  return decode.generate(model, params, batch["input_ids"], batch["attention_mask"], settings)


@functools.lru_cache(maxsize=None)
def _identity_on(devices: tuple[jax.Device, ...] | None):
  return jax.pmap(lambda tree: tree, axis_name=AXIS, donate_argnums=(0,),
                  devices=list(devices) if devices else None)


def replicate(tree, devices: Sequence[jax.Device] | None = None):
  """`tree` copied to every local device (or to `devices`), laid out exactly as the pmapped
  steps lay out their outputs (a mesh axis named AXIS). `flax.jax_utils.replicate` alone names
  its mesh axis differently, and a pmapped step would compile a second time when its first
  outputs come back as inputs."""
  devices = tuple(devices) if devices else None
  return _identity_on(devices)(jax_utils.replicate(tree, devices))


def donates_train_state() -> bool:
  """Whether the pmapped train step donates its state (updates it in place): on GPUs and TPUs.

  Not on CPUs: there XLA kept each Adam moment's old value alive past its in-place update and
  copied the whole state twice per step (726 MB for t5-small; the step took 8% longer). Host
  memory pays for a second state instead.
  """
  return jax.default_backend() != "cpu"


def pmap_train_step(learning_rate_fn: optax.Schedule, config):
  """`train_step` pmapped over local devices, donating the state where `donates_train_state`."""
  return jax.pmap(
      functools.partial(train_step, learning_rate_fn=learning_rate_fn,
                        label_smoothing=config.label_smoothing_factor,
                        accumulation_steps=config.gradient_accumulation_steps),
      axis_name=AXIS, in_axes=(0, 0, None),
      donate_argnums=(0,) if donates_train_state() else ())


def pmap_eval_steps(model, settings: decode.GenerationSettings):
  """(p_eval_step, p_generate_step) pmapped over local devices."""
  p_eval_step = jax.pmap(functools.partial(eval_step, apply_fn=model.apply), axis_name=AXIS)
  p_generate_step = jax.pmap(
      functools.partial(generate_step, model=model, settings=settings), axis_name=AXIS)
  return p_eval_step, p_generate_step

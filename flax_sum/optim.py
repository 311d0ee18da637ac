"""Learning-rate schedules and optimizers (optax), configured by the run config."""

from __future__ import annotations

import optax
from flax import traverse_util

from flax_sum.errors import UserError

SCHEDULES = ("linear", "cosine", "constant")
OPTIMIZERS = ("adamw", "adafactor")


def create_learning_rate_schedule(config, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `learning_rate`, then `lr_scheduler_type` decay to 0 at the end."""
  peak = config.learning_rate
  warmup_steps = min(config.warmup_steps, total_steps)
  decay_steps = max(total_steps - warmup_steps, 1)
  kind = config.lr_scheduler_type
  if kind == "linear":
    decay = optax.linear_schedule(peak, 0.0, decay_steps)
  elif kind == "cosine":
    decay = optax.cosine_decay_schedule(peak, decay_steps)
  elif kind == "constant":
    decay = optax.constant_schedule(peak)
  else:
    raise UserError(f"--lr_scheduler_type {kind!r} is not supported: use one of "
                    f"{', '.join(SCHEDULES)}")
  if warmup_steps == 0:
    return decay
  warmup = optax.linear_schedule(0.0, peak, warmup_steps)
  return optax.join_schedules([warmup, decay], [warmup_steps])


def decay_mask(params):
  """True for the kernels and embeddings that get weight decay; layer norm scales do not.

  T5 has no biases; any parameter named `bias` would be excluded too, as in the HF Trainer.
  """
  flat = traverse_util.flatten_dict(params)
  mask = {path: not any("layer_norm" in name or name == "bias" for name in path)
          for path in flat}
  return traverse_util.unflatten_dict(mask)


def create_optimizer(config, schedule: optax.Schedule) -> optax.GradientTransformation:
  if config.optim == "adamw":
    optimizer = optax.adamw(schedule, b1=config.adam_beta1, b2=config.adam_beta2,
                            eps=config.adam_epsilon, weight_decay=config.weight_decay,
                            mask=decay_mask)
  elif config.optim == "adafactor":
    # T5's own optimizer: factored second moments, no first moment, update clipping at 1.
    optimizer = optax.adafactor(schedule, weight_decay_rate=config.weight_decay or None,
                                weight_decay_mask=decay_mask)
  else:
    raise UserError(f"--optim {config.optim!r} is not supported: use one of "
                    f"{', '.join(OPTIMIZERS)}")
  if config.max_grad_norm and config.max_grad_norm > 0:
    optimizer = optax.chain(optax.clip_by_global_norm(config.max_grad_norm), optimizer)
  return optimizer

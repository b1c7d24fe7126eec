"""Trigger reverse-engineering (Neural Cleanse, Wang et al. 2019) as an engine problem.

One lane = one (target class, optional source class, restart). The lane
learns a mask m [H, W] and a pattern p [C, H, W] such that
x' = (1 - m) * x + m * p is classified as the target, minimising
cross-entropy + cost * |m|_1. Mask and pattern are tanh-parametrised to stay
in [0, 1]. The cost schedule is the paper's, held per lane as arrays: cost
starts at 0, switches to `init_cost` after `patience` epochs of attack
success >= `success_threshold`, then is multiplied up on success streaks and
divided down on failure streaks. A lane stops early once cost has moved both
ways and its best mask norm has not improved for `early_stop_patience` epochs.
An "epoch" is `steps_per_epoch` mini-batches. TABOR's regularisers (smoothness, blocking, overlaying)
are optional terms of the same loss (`InversionConfig`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from jaxrisk.data.images import stamp
from jaxrisk.models.classifiers import logits_fn
from jaxrisk.scan.config import InversionConfig

_EPS = 1e-7


def to_mask(raw):
    """tanh parametrisation: any real array -> values in [0, 1]."""
    return jnp.tanh(raw) / (2.0 - _EPS) + 0.5


class InversionState(NamedTuple):
    """One lane's state (shapes per lane; the engine adds a leading restart axis)."""
    raw: dict                 # {"mask": [H, W], "pattern": [C, H, W]} before the tanh
    opt: optax.OptState       # Adam's moments of `raw`
    target: jax.Array         # [] int32 class the trigger must reach
    source: jax.Array         # [] int32 class stamped (-1: every class but the target)
    cost: jax.Array           # [] current weight of |m|_1 (0 until the first success streak)
    cost_set_count: jax.Array # [] int32 successful epochs while the cost is still 0
    up_count: jax.Array       # [] int32 successful epochs in a row (cost goes up at `patience`)
    down_count: jax.Array     # [] int32 failed epochs in a row (cost goes down at `patience`)
    up_flag: jax.Array        # [] bool the cost has gone up at least once
    down_flag: jax.Array      # [] bool the cost has gone down at least once
    epoch_step: jax.Array     # [] int32 steps into the current epoch
    epoch_acc: jax.Array      # [] sum of this epoch's batch attack success
    best_l1: jax.Array        # [] smallest successful mask norm so far (inf: none yet)
    best_mask: jax.Array      # [H, W] that mask
    best_pattern: jax.Array   # [C, H, W] its pattern
    stop_best: jax.Array      # [] best norm at the last improvement (early stop)
    stop_count: jax.Array     # [] int32 epochs without improvement
    stopped: jax.Array        # [] bool early-stopped


@struct.dataclass
class TriggerInversion:
    """The search problem; arrays are engine arguments, the rest is static."""
    params: nnx.State
    images: jax.Array  # [N, C, H, W] optimisation pool
    labels: jax.Array  # [N]
    graphdef: nnx.GraphDef = struct.field(pytree_node=False)
    cfg: InversionConfig = struct.field(pytree_node=False, default=InversionConfig())

    def optimizer(self):
        return optax.adam(self.cfg.learning_rate, b1=0.5, b2=0.9)

    def init(self, key, lane) -> InversionState:
        """`lane`: {"target": int, "source": int (-1: every class but the target)}."""
        _, c, h, w = self.images.shape
        k1, k2 = jax.random.split(key)
        raw = {"mask": jax.random.uniform(k1, (h, w), minval=-2.0, maxval=2.0),
               "pattern": jax.random.uniform(k2, (c, h, w), minval=-2.0, maxval=2.0)}
        zero_f, zero_i = jnp.float32(0), jnp.int32(0)
        return InversionState(
            raw=raw, opt=self.optimizer().init(raw),
            target=jnp.int32(lane["target"]), source=jnp.int32(lane["source"]),
            cost=zero_f, cost_set_count=zero_i, up_count=zero_i, down_count=zero_i,
            up_flag=jnp.bool_(False), down_flag=jnp.bool_(False),
            epoch_step=zero_i, epoch_acc=zero_f,
            best_l1=jnp.float32(jnp.inf), best_mask=jnp.zeros((h, w)), best_pattern=jnp.zeros((c, h, w)),
            stop_best=jnp.float32(jnp.inf), stop_count=zero_i, stopped=jnp.bool_(False),
        )

    def _batch(self, state, key):
        pool = jnp.where(state.source >= 0, self.labels == state.source, self.labels != state.target)
        idx = jax.random.choice(key, self.labels.shape[0], (self.cfg.batch_size,), p=pool / pool.sum())
        return self.images[idx], self.labels[idx]

    def _tabor(self, mask, pattern, x, y, target):
        """TABOR's regularisers, those with a weight above 0 (static: the others are not computed)."""
        cfg, extra = self.cfg, 0.0
        if cfg.smoothness:
            extra += cfg.smoothness * (jnp.abs(jnp.diff(mask, axis=0)).sum() + jnp.abs(jnp.diff(mask, axis=1)).sum())
        if cfg.blocking:
            kept = logits_fn(self.graphdef, self.params, x * (1.0 - mask))
            extra += cfg.blocking * optax.softmax_cross_entropy_with_integer_labels(kept, y).mean()
        if cfg.overlaying:
            alone = logits_fn(self.graphdef, self.params, (mask * pattern)[None])
            extra += cfg.overlaying * optax.softmax_cross_entropy_with_integer_labels(alone, target[None]).mean()
        return extra

    def step(self, state, key):
        cfg = self.cfg
        x, y = self._batch(state, key)
        target = state.target

        def loss_fn(raw):
            mask, pattern = to_mask(raw["mask"]), to_mask(raw["pattern"])
            logits = logits_fn(self.graphdef, self.params, stamp(x, mask, pattern))
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.full(x.shape[0], target)).mean()
            l1 = jnp.sum(mask)
            acc = jnp.mean(jnp.argmax(logits, -1) == target)
            return ce + state.cost * l1 + self._tabor(mask, pattern, x, y, target), (ce, l1, acc)

        (loss, (ce, l1, acc)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.raw)
        updates, opt = self.optimizer().update(grads, state.opt, state.raw)
        raw = optax.apply_updates(state.raw, updates)
        s = state._replace(raw=raw, opt=opt, epoch_step=state.epoch_step + 1, epoch_acc=state.epoch_acc + acc)
        s = jax.lax.cond(s.epoch_step >= cfg.steps_per_epoch, self._end_epoch, lambda s: s, s)
        metrics = {"loss": loss, "ce": ce, "l1": l1, "acc": acc, "cost": state.cost, "best_l1": s.best_l1}
        return s, metrics

    def _end_epoch(self, s):
        """The paper's per-epoch bookkeeping: best mask, early stop, cost schedule."""
        cfg = self.cfg
        mask, pattern = to_mask(s.raw["mask"]), to_mask(s.raw["pattern"])
        l1 = jnp.sum(mask)
        success = s.epoch_acc / s.epoch_step >= cfg.success_threshold
        better = success & (l1 < s.best_l1)
        best_l1 = jnp.where(better, l1, s.best_l1)
        found = jnp.isfinite(best_l1)
        stalled = found & (best_l1 >= cfg.early_stop_threshold * s.stop_best)
        stop_count = jnp.where(stalled, s.stop_count + 1, jnp.where(found, 0, s.stop_count))
        stopped = s.up_flag & s.down_flag & (stop_count >= cfg.early_stop_patience)

        cost_off = s.cost == 0
        cost_set_count = jnp.where(cost_off & success, s.cost_set_count + 1, 0)
        switch_on = cost_off & (cost_set_count >= cfg.patience)
        up_count = jnp.where(success, s.up_count + 1, 0)
        down_count = jnp.where(success, 0, s.down_count + 1)
        up_count, down_count = jnp.where(switch_on, 0, up_count), jnp.where(switch_on, 0, down_count)
        go_up = ~cost_off & (up_count >= cfg.patience)
        go_down = ~cost_off & ~go_up & (down_count >= cfg.patience)
        cost = jnp.where(switch_on, cfg.init_cost, s.cost)
        cost = jnp.where(go_up, cost * cfg.cost_up, jnp.where(go_down, cost / cfg.cost_down, cost))
        return s._replace(
            cost=cost, cost_set_count=cost_set_count,
            up_count=jnp.where(go_up, 0, up_count), down_count=jnp.where(go_down, 0, down_count),
            up_flag=(s.up_flag | go_up) & ~switch_on, down_flag=(s.down_flag | go_down) & ~switch_on,
            epoch_step=jnp.int32(0), epoch_acc=jnp.float32(0),
            best_l1=best_l1, best_mask=jnp.where(better, mask, s.best_mask),
            best_pattern=jnp.where(better, pattern, s.best_pattern),
            stop_best=jnp.minimum(best_l1, s.stop_best), stop_count=stop_count, stopped=stopped,
        )

    def done(self, state):
        return state.stopped

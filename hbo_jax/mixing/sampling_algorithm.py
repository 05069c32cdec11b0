"""Sampling strategies as one training method: the model takes plain fine-tuning steps,
and what is learned (or fixed, or replayed) is the mixture the batches are drawn from.

Covers every `mixing.strategy`: the static ones (proportional, temperature, uniform),
HBO and its ablations, the MoS-style and MultiDDS actors, and `replay`. The Mixer
observes each step's statistics and updates the actors on its schedule; new
probabilities go into the schedule the sampler reads.
"""

from __future__ import annotations

from hbo_jax.algorithm import Algorithm, PlanContext, RunContext
from hbo_jax.data.sampler import ProbabilitySchedule
from hbo_jax.mixing import global_rewards, rewards
from hbo_jax.mixing.strategies import Mixer, load_schedule
from hbo_jax.mixing.strategy import resolve
from hbo_jax.step import abstract_train_state, init_train_state, make_optimizer, make_train_step, state_shardings


def _optimizer(tc):
    return make_optimizer(tc.learning_rate, tc.steps, tc.warmup_steps, tc.weight_decay, tc.grad_clip)


class SamplingAlgorithm(Algorithm):
    """Fine-tuning with a (learned, static or replayed) sampling distribution."""

    def __init__(self, ctx: RunContext):
        cfg, data, mesh, tc = ctx.cfg, ctx.data, ctx.mesh, ctx.cfg.train
        self.total_steps = tc.steps
        self.strategy = resolve(cfg.mixing)
        self.label = self.strategy.name
        tx = _optimizer(tc)
        self.train_state = init_train_state(ctx.params, tx, mesh)
        self.mixer = Mixer(self.strategy, cfg.mixing, data.sizes, data.leaves(), data.train, ctx.graphdef, mesh,
                           cfg.data.seq_len, data.pad_id, tc.resolved_data_seed, dev_stores=data.eval,
                           train_batch=tc.batch_size)
        # The train step returns what the train-sourced rewards need, and nothing more: each
        # row's reference NLL (batches carry it), each example's gradient norm (only in the
        # steps before a global update, so that step is compiled separately).
        outputs = self.strategy.step_outputs
        ref = "ref_nll" in outputs
        self.batch_fields = frozenset(outputs & {"ref_nll"})
        args = (ctx.graphdef, tx, mesh, len(data.names) * data.num_buckets, state_shardings(self.train_state))
        self._step = make_train_step(*args, ref_nll=ref, packing=bool(ctx.pack_rows))
        self._norm_step = (make_train_step(*args, ref_nll=ref, packing=bool(ctx.pack_rows), example_gradnorm=True)
                           if "example_gradnorm" in outputs else None)
        self.schedule = (load_schedule(cfg.mixing.replay_from, data.names, data.num_buckets)
                         if cfg.mixing.replay_from else ProbabilitySchedule(*self.mixer.probabilities()))

    @property
    def mixing_seconds(self) -> float:
        return self.mixer.seconds

    def state(self) -> dict:
        return {"train": self.train_state, "mixer": self.mixer.state}

    def load_state(self, trees: dict, meta: dict) -> None:
        self.train_state, self.mixer.state = trees["train"], trees["mixer"]
        self.mixer.load_statistics(meta.get("mix_acc"))

    def meta(self) -> dict:
        return {"mix_acc": self.mixer.saved_statistics()}

    def start(self) -> None:
        self.mixer.start(self.train_state.params)

    def resumed(self, step: int) -> list[dict]:
        # A replayed schedule's future entries, logged like updates.
        return [{"step": e["from_step"], "from_step": e["from_step"], "replayed": True,
                 "p_global": e["p_global"], "p_local": e["p_local"]}
                for e in self.schedule.entries if e["from_step"] > step]

    def step(self, done: int, batch) -> tuple[dict, list[dict]]:
        mixer = self.mixer
        with_norms = mixer.wants_example_gradnorm(done, self.total_steps)
        mixer.time_norm_steps(done, self.train_state, after=False)
        self.train_state, metrics = (self._norm_step if with_norms else self._step)(self.train_state, batch)
        if with_norms:
            mixer.time_norm_steps(done, self.train_state, after=True)
        metrics = mixer.observe(dict(metrics))
        # No update after the last step: nothing would sample from it.
        record = mixer.update(done, self.train_state.params) if done < self.total_steps else None
        if record is None:
            return metrics, []
        self.schedule.set(done, record["p_global"], record["p_local"])
        record["from_step"] = done
        return metrics, [record]

    def summary(self) -> dict:
        import jax

        m = self.mixer
        return {"strategy": self.strategy.name, "estimated_probe_share": m.estimated_probe_share,
                "actor_updates": jax.device_get(m.state.num_updates).tolist(),
                "skipped_updates": int(jax.device_get(m.state.num_skipped))}

    @classmethod
    def programs(cls, plan: PlanContext) -> list[tuple[str, object]]:
        cfg, mesh = plan.cfg, plan.mesh
        tx = _optimizer(cfg.train)
        state = abstract_train_state(plan.params, tx, mesh)
        strategy = resolve(cfg.mixing)
        ref, packing = "ref_nll" in strategy.step_outputs, cfg.data.packing
        shardings = state_shardings(state)
        groups = plan.num_datasets * cfg.data.num_buckets
        # Packing's worst case is its fallback step: one row per example.
        batch = plan.batch(cfg.train.batch_size, ref_nll=ref, packing=packing)
        step = make_train_step(plan.graphdef, tx, mesh, groups, shardings, ref_nll=ref, packing=packing)
        out = [("train step", step.lower(state, batch).compile())]
        if "example_gradnorm" in strategy.step_outputs:
            step = make_train_step(plan.graphdef, tx, mesh, groups, shardings, ref_nll=ref, packing=packing,
                                   example_gradnorm=True)
            out.append(("train step + example grad norms", step.lower(state, batch).compile()))
        elif strategy.global_probes:
            mc, k = cfg.mixing, cfg.data.num_buckets
            fn = global_rewards.MAKERS[strategy.global_reward](plan.graphdef, mesh, plan.num_datasets)
            probes = plan.batch(plan.num_datasets * rewards.padded_rows_per_dataset(
                plan.num_datasets, mc.global_probes_per_bucket * k, mesh))
            args = [probes["input_ids"], probes["targets"], probes["loss_mask"]]
            if strategy.global_reward == "dev_cosine":
                dev = plan.batch(rewards.padded_rows_per_dataset(1, mc.global_probes_per_bucket * k, mesh))
                args += [dev["input_ids"], dev["targets"], dev["loss_mask"]]
            out.append((f"global probes ({strategy.global_reward})", fn.lower(state.params, *args).compile()))
        return out

"""`train_and_evaluate(config, workdir)`: the training loop around the pure pieces.

Order of work per step: fetch the host batch, dispatch the jitted step, then look at the *previous*
step's metrics, so the host never stalls the device except on log / eval / checkpoint steps. Every
step's loss, grad norm and parameters are checked finite; a non-finite step stops the run without
saving, so the newest checkpoint on disk is the last good one. SIGTERM (preemption) and Ctrl-C save a
checkpoint at the next step boundary and return (`interrupts.py`); rerunning the same command resumes.

Before any work (no data read, nothing compiled), inside `cli_errors.checking_inputs()`: the run
settings are checked (`run_settings.py`), the workdir is created, and a workdir holding another
model's run stops the run (`run_identity.py`); the data is then read in the same phase, so a missing
file or a bad field is the user's one-line error, while a failure after it keeps its traceback.
"""

import functools
import json
import os
import time

import jax
import jax.numpy as jnp

from moda_jax import cli_errors
from moda_jax.train import checkpoint
from moda_jax.data import pipeline
from moda_jax.model import flops
from moda_jax.model import kernel_call
from moda_jax.train import metrics
from moda_jax.train import interrupts
from moda_jax.train import optimizer as optim
from moda_jax.train import run_identity
from moda_jax.train import run_settings
from moda_jax.train import sharding
from moda_jax.train import step as ts
from moda_jax.model.config import ModelConfig
from moda_jax.model.transformer import Transformer


def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _step_with_check(state, batch, **kwargs):
  """`train_step` plus one flag: loss, grad norm and updated parameters all finite."""
  new_state, m = ts.train_step(state, batch, **kwargs)
  m["finite"] = (jnp.isfinite(m["loss"]) & jnp.isfinite(m["grad_norm"])
                 & _all_finite(new_state.params)).astype(jnp.float32)
  return new_state, m


class _Run:
  """State of one training run: compiled functions, data, checkpointer, writer."""

  def __init__(self, config, workdir: str, model_cfg: ModelConfig, mesh, pipelines: pipeline.DataPipelines,
               ckpt: checkpoint.Checkpointer):
    self.config, self.workdir, self.model_cfg, self.mesh = config, workdir, model_cfg, mesh
    self.pipelines, self.ckpt = pipelines, ckpt
    model = Transformer(self.model_cfg)
    optimizer = optim.make_optimizer(config)
    tokens = ts.init_tokens(self.mesh, config.seq_len)
    rep = sharding.replicated(self.mesh)
    batch_sh = {k: sharding.batch_sharding(self.mesh) for k in pipeline.BATCH_KEYS}
    with sharding.activation_context(self.mesh, constrain_activations=False):
      self.abstract, self.shardings = ts.state_shardings(model, optimizer, self.mesh, config.seed, tokens)
    self.init_fn = jax.jit(lambda: ts.init_train_state(model, optimizer, config.seed, tokens),
                           out_shardings=self.shardings)
    step_cfg = ts.StepConfig(config.z_loss_weight, config.grad_accum_steps, config.loss_chunk_len)
    self.step_fn = jax.jit(
        functools.partial(_step_with_check, model=model, optimizer=optimizer,
                          schedule=optim.learning_rate_schedule(config), cfg=step_cfg),
        in_shardings=(self.shardings, batch_sh), out_shardings=(self.shardings, rep),
        donate_argnums=0)
    self.eval_fn = jax.jit(functools.partial(ts.eval_step, model=model, loss_chunk_len=config.loss_chunk_len),
                           in_shardings=(self.shardings.params, batch_sh), out_shardings=rep)
    # data.val_path: one set per file (val_batches is all of them); else one unnamed set.
    self.val_sets = {name: [sharding.global_batch(b, self.mesh) for b in batches]
                     for name, batches in self.pipelines.val_sets.items()}
    self.val_batches = ([b for batches in self.val_sets.values() for b in batches] if self.val_sets
                        else [sharding.global_batch(b, self.mesh) for b in self.pipelines.val_batches])

  def evaluate(self, params) -> dict[str, float]:
    """{"val_loss": over every validation token, "val_loss/<file>": per data.val_path file}."""
    sets = self.val_sets or {None: self.val_batches}
    sums = jax.device_get({name: [self.eval_fn(params, b) for b in batches] for name, batches in sets.items()})
    losses, ce_sum, tokens = {}, 0.0, 0.0
    for name, parts in sums.items():
      set_ce, set_tokens = sum(float(p["ce_sum"]) for p in parts), sum(float(p["tokens"]) for p in parts)
      ce_sum, tokens = ce_sum + set_ce, tokens + set_tokens
      if name is not None:
        losses[f"val_loss/{name}"] = set_ce / max(set_tokens, 1.0)
    return {"val_loss": ce_sum / max(tokens, 1.0), **losses}

  def dispatch_step(self, state, batch):
    """One training step, dispatched and not waited for: (state, device metrics, the attention kernels
    the step was traced on, empty unless this call traced it)."""
    with sharding.activation_context(self.mesh), kernel_call.recording_implementations() as attention_impls:
      state, device_metrics = self.step_fn(state, batch)
    return state, device_metrics, attention_impls

  def throughput(self) -> metrics.Throughput:
    cfg = self.config
    peak = cfg.peak_flops_per_device or flops.peak_flops_per_device(jax.devices()[0].device_kind)
    return metrics.Throughput(
        tokens_per_step=cfg.batch_size * cfg.seq_len,
        flops_per_step=cfg.batch_size * flops.train_flops_per_sequence(self.model_cfg, cfg.seq_len),
        peak_flops=peak * jax.device_count() if peak else None)


def _record_data_stats(run: _Run, writer: metrics.MetricsWriter) -> None:
  """Logs the unigram entropy of (a sample of) the training documents: the loss to beat."""
  docs = run.pipelines.train_docs
  sample = [docs[i] for i in range(min(len(docs), run.config.data.entropy_sample_docs))]
  entropy = pipeline.unigram_entropy(sample, run.pipelines.tokenizer)
  stats = {"unigram_entropy_nats": entropy, "train_documents": len(docs),
           "tokenizer_vocab_size": run.pipelines.tokenizer.vocab_size}
  if jax.process_index() == 0:
    with open(os.path.join(run.workdir, run_identity.DATA_STATS_JSON), "w") as f:
      json.dump(stats, f, indent=2)
  writer.message(f"data: {len(docs)} training documents; unigram entropy {entropy:.4f} nats/token")


def prepare_run(config, workdir: str, devices, restart: bool) -> tuple[_Run, str | None]:
  """The run, after every check of its inputs; also the line to tell the user about the workdir. Public for
  tools that drive the trainer's own state, step and data (scripts/profile_train_step.py)."""
  with cli_errors.checking_inputs():
    model_cfg, mesh = run_settings.check(config, devices)
    run_settings.make_workdir(workdir)
    note = run_identity.prepare(workdir, config, restart=restart)
    shard = pipeline.HostShard(jax.process_index(), jax.process_count())
    pipelines = pipeline.make_pipelines(config, shard)
    ckpt = checkpoint.Checkpointer(workdir, keep=config.keep_checkpoints, async_save=config.checkpoint_async)
  # Tracing the model for the state's shapes is where a backend says it cannot run this config here
  # (e.g. an explicit attention_impl for another platform): that, and only that, is the user's too.
  try:
    with cli_errors.checking_inputs(NotImplementedError):
      return _Run(config, workdir, model_cfg, mesh, pipelines, ckpt), note
  except BaseException:
    ckpt.close()
    raise


def train_and_evaluate(config, workdir: str, devices=None, *, restart: bool = False) -> dict[str, float]:
  """Trains `config` in `workdir`, resuming from its latest checkpoint; returns the last metrics.

  `devices`: the devices of the mesh (default: all of them). `restart`: delete the run already in
  `workdir` (checkpoints and logs) and start over; without it, a workdir holding another model's run
  raises `cli_errors.UserError` before any work.
  """
  started = time.perf_counter()
  run, note = prepare_run(config, workdir, devices, restart)
  inputs_ready = time.perf_counter()  # the data pipelines exist (documents read, pretokenized)
  train_iter = iter(run.pipelines.train)
  latest = run.ckpt.latest_step()
  if latest is None:
    with sharding.activation_context(run.mesh, constrain_activations=False):
      state = run.init_fn()
  else:
    target = checkpoint.abstract_with_shardings(run.abstract, run.shardings)
    state = run.ckpt.restore(latest, target, train_iter)
  step = int(jax.device_get(state.step))
  startup = (inputs_ready - started, time.perf_counter() - inputs_ready)  # (inputs and data, state)
  if jax.process_index() == 0:
    checkpoint.write_config_json(workdir, config)
  writer = metrics.MetricsWriter(workdir, enabled=jax.process_index() == 0, start_step=step,
                                 total_steps=config.total_steps, progress_bar=config.progress_bar)
  if note:
    writer.message(note)
  _record_data_stats(run, writer)
  stop = interrupts.StopRequest()
  stop.install()
  try:
    return _loop(run, state, step, train_iter, writer, stop, startup)
  finally:
    run.ckpt.wait()
    run.ckpt.close()
    writer.close()
    stop.uninstall()


def _check_finite(run: _Run, step: int, scalars: dict[str, float]) -> None:
  if scalars["finite"] < 1:
    run.ckpt.wait()
    raise FloatingPointError(
        f"non-finite training at step {step}: loss={scalars['loss']}, grad_norm="
        f"{scalars['grad_norm']}. Stopped without saving; the last good checkpoint (step "
        f"{run.ckpt.latest_step()}) is kept in {run.ckpt.directory}.")


def _loop(run: _Run, state, step: int, train_iter, writer, stop: interrupts.StopRequest,
          startup: tuple[float, float]) -> dict[str, float]:
  cfg = run.config
  loop_started = time.perf_counter()
  rates = run.throughput()
  first_step = step
  deferred = None  # (step, device metrics) not yet checked for finiteness
  scalars: dict[str, float] = {}
  while step < cfg.total_steps:
    batch = sharding.global_batch(next(train_iter), run.mesh)
    # The first call traces the step: say which attention kernels it was built on (again on a retrace).
    state, device_metrics, attention_impls = run.dispatch_step(state, batch)
    if attention_impls:
      writer.message(kernel_call.describe_implementations(attention_impls))
    step += 1
    if step == first_step + 1:
      # The first call compiles: keep that out of the step-time figures, and say where start-up went.
      jax.block_until_ready(device_metrics)
      writer.message(f"startup: inputs and data {startup[0]:.1f} s, state {startup[1]:.1f} s, "
                     f"first step (compiling) {time.perf_counter() - loop_started:.1f} s")
      rates.reset(step)
    if deferred is not None:  # the previous step finished while this one was being dispatched
      _check_finite(run, deferred[0], jax.device_get(deferred[1]))
      deferred = None
    last = step == cfg.total_steps
    poll = last or step % cfg.log_every == 0
    stopping = stop.agreed() if (poll or jax.process_count() == 1) else False
    due_log = poll
    due_eval = bool(run.val_batches) and cfg.eval_every > 0 and (last or step % cfg.eval_every == 0)
    due_ckpt = stopping or (cfg.checkpoint_every > 0 and (last or step % cfg.checkpoint_every == 0))
    if not (due_log or due_eval or due_ckpt):
      deferred = (step, device_metrics)
      writer.advance()
      continue
    scalars = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
    _check_finite(run, step, scalars)
    scalars.update(rates.measure(step))
    scalars["perplexity"] = metrics.perplexity(scalars["loss"])
    if due_eval:
      with sharding.activation_context(run.mesh):
        scalars.update(run.evaluate(state.params))
      scalars["val_perplexity"] = metrics.perplexity(scalars["val_loss"])
    if due_log or due_eval:
      writer.write(step, {k: v for k, v in scalars.items() if k != "finite"})
    if due_ckpt:
      run.ckpt.save(step, state, train_iter, cfg)
    rates.reset(step)  # keep evaluation and checkpoint time out of the next step-time figure
    writer.advance()
    if stopping:
      writer.message(f"{stop.signal_name}: saved the checkpoint at step {step}; rerun the same command "
                     "to resume.")
      break
  return scalars

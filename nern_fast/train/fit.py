"""``fit``: run a recipe (a list of stages) on a trained network and report what it keeps.

Stages (``configs/`` has the recipes):

* ``reconstruct`` — reconstruction only: each step decodes just the sampled kernels (subset
  decode) and compares them with the target's. No data, no CNN forward. Decoupled stage 1; with
  ``predictor: new`` and ``target: previous``, a progressive round.
* ``distill`` — decode the network, run the CNN with those weights and train on
  reconstruction + feature-map + logit distillation (weights, warm-up, NeRN-style sampled or full
  gradients). NeRN's joint recipe; decoupled stage 2 (logits only, optional stronger teacher);
  data-free with ``inputs: noise``.

After every stage the reconstructed network is evaluated on the test set. Outputs in ``OUT``:
``checkpoint.pt`` (resumable), ``log.jsonl``, ``predictor.pt`` (final), ``stages/*.pt``,
``metrics.json``, ``report.md``, ``accuracy.png``, ``config.yaml``.
"""
from __future__ import annotations

import gc
import math
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from .. import ops
from ..config import Config, ConfigError, dump_yaml, to_dict
from ..cuda_capture import GRAPHED_CALLABLES_THREAD_LOCAL
from ..predictor import FastPredictor
from . import setup
from .checkpoint import (CHECKPOINT_NAME, config_differences, file_digest, load_checkpoint, save_checkpoint,
                         set_rng_state)
from .errors import TrainingDiverged
from .evaluation import accuracy
from .graphs import graphed_distillation, maybe_graphed
from .logger import RunLog, StepMeter, progress_bar
from .losses import feature_module_names, per_layer_rmse, rmse
from .objectives import DistillationObjective, ReconstructionObjective
from .optim import build_optimizer, build_scheduler, optimizer_step
from .report import write_outputs
from .samplers import KernelSampler, kernel_norms

RUN_KEY = "run"  # extra entry of predictor files: how to rebuild the network and its data
# What a run writes in its folder (--overwrite removes them, once the new run's set-up succeeded;
# permutations/ is a cache that checks itself and stays).
RUN_OUTPUTS = (CHECKPOINT_NAME, "metrics.json", "log.jsonl", "predictor.pt", "report.md",
               "accuracy.png", "stages", "tensorboard")


class StageInterrupted(KeyboardInterrupt):
    """Ctrl-C during a stage, after the checkpoint was written."""


def remove_outputs(out: Path) -> None:
    """Remove a previous run's outputs from ``out`` (see RUN_OUTPUTS)."""
    for name in RUN_OUTPUTS:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def load_teacher(spec, task, index: int):
    """Stage ``index``'s teacher network, on the CPU (ConfigError without its checkpoint)."""
    if not spec.checkpoint:
        raise ConfigError(f"stages.{index}.teacher.checkpoint: a teacher needs its trained weights")
    return setup.make_network(spec, task, f"stages.{index}.teacher")


def resume_differences(state: dict, cfg: dict) -> list[str]:
    """Config keys whose change a resume from ``state`` cannot honour: all but those of the stages
    not started yet (after the checkpoint's stage, or that stage itself at its step 0)."""
    first_free = state["stage_index"] + (1 if state["step"] else 0)
    free = tuple(f"stages.{i}." for i in range(first_free, len(cfg.get("stages") or [])))
    # Stage names change nothing that was computed (unnamed stages are numbered by type over all
    # stages: a later stage's new type may rename an earlier one).
    return [key for key in config_differences(state["config"], cfg)
            if not ((key + ".").startswith(free) or (key.startswith("stages.") and key.endswith(".name")))]


def save_predictor(pred: FastPredictor, path: Path, cfg: Config, **extra) -> None:
    """A predictor file that also records the network and data it was fitted on (for eval)."""
    from ..io import atomic_save
    data = pred.to_file_dict()
    data[RUN_KEY] = {"model": to_dict(cfg.model), "data": to_dict(cfg.data),
                     "predictor": to_dict(cfg.predictor),
                     "cwd": str(Path.cwd()),  # relative paths above are relative to it (eval)
                     **extra}
    atomic_save(data, path)


def backend_name(pred: FastPredictor) -> str:
    try:
        request = ops.make_request(pred.weights(), pred.layout, pred.encoding, None, pred.precision)
        return ops.select_backend(request, pred.backend).name
    except Exception as exc:  # reporting only
        return f"unknown ({exc})"


class _CtrlC:
    """The first Ctrl-C asks the step loop to stop after the current step (a consistent
    checkpoint); a second one stops at once."""

    def __init__(self):
        self.requested = False
        self.hard = False
        self._previous = None

    def _handler(self, signum, frame):
        if self.requested:
            self.hard = True
            raise KeyboardInterrupt
        self.requested = True

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)

    def remove(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


class FitRun:
    """One ``nern-fast fit`` run. ``on_step(stage_index, step)`` is a hook for tests."""

    def __init__(self, cfg: Config, out_dir, resume: bool = False, overwrite: bool = False,
                 on_step: Optional[Callable[[int, int], None]] = None, echo: Callable = print,
                 resume_command: str = "--resume"):
        if not cfg.stages:
            raise ConfigError("stages: the config has no stages to run; see configs/ for recipes")
        if not cfg.model.checkpoint:
            raise ConfigError("model.checkpoint: fit needs the trained network; train one with "
                              "`nern-fast train-base` or point it at a checkpoint")
        self.cfg = cfg
        self.out = Path(out_dir)
        self.on_step = on_step
        self.echo = echo
        self.resume_command = resume_command  # how an interrupted run is continued, for its messages
        self.resume_state = None
        self.replace_outputs = False
        self.model_digest = None  # SHA-256 of the network file, read once (resume compares it)
        self.checked_teachers: dict[int, torch.nn.Module] = {}  # stage index -> teacher loaded by the check
        ckpt = self.out / CHECKPOINT_NAME
        if resume and overwrite:
            raise ValueError("--resume continues the run in --out and --overwrite replaces it: "
                             "give one of them")
        if self.out.exists() and not self.out.is_dir():
            raise FileExistsError(f"--out {self.out} is a file; give a folder for the run")
        if resume:
            if not ckpt.exists():
                raise FileNotFoundError(f"--resume: {ckpt} does not exist; start without --resume")
            self.resume_state = load_checkpoint(ckpt, map_location="cpu")
            diff = resume_differences(self.resume_state, to_dict(cfg))
            if diff:
                raise ConfigError(f"--resume: the config differs from the checkpoint's in "
                                  f"{', '.join(diff[:6])}; resume with the same config (and --set; "
                                  f"only stages not started yet may change) or start a new --out")
            saved_digest = self.resume_state.get("model_digest")
            if saved_digest is not None and Path(cfg.model.checkpoint).is_file():
                self.model_digest = file_digest(cfg.model.checkpoint)
                if self.model_digest != saved_digest:
                    raise ConfigError(f"--resume: {cfg.model.checkpoint} is not the network this run "
                                      f"started from (its contents changed: trained again?); start a "
                                      f"new --out for it, or put the original file back to resume")
        elif ckpt.exists() or (self.out / "metrics.json").exists():
            if not overwrite:
                raise FileExistsError(f"{self.out} already holds a run; continue it with --resume, "
                                      f"replace it with --overwrite, or choose another --out")
            self.replace_outputs = True  # once the set-up has checked everything (_setup)

    # ------------------------------------------------------------------ setup
    def _setup(self) -> None:
        """Everything that can fail on the config, files or data before the run folder changes:
        an --overwrite removes the old run's outputs only then."""
        cfg = self.cfg
        self.device = setup.apply_runtime(cfg)
        self.task = setup.load_data(cfg)
        self.model = setup.frozen(setup.make_network(cfg.model, self.task), self.device)
        if self.model_digest is None:
            self.model_digest = file_digest(cfg.model.checkpoint)
        self._check_stages()
        self.out.mkdir(parents=True, exist_ok=True)
        self.layout = setup.make_layout(self.model, cfg.predictor, self.out / "permutations",
                                        cfg.logging.progress)
        if self.replace_outputs:
            remove_outputs(self.out)
        dump_yaml(cfg, self.out / "config.yaml")
        self.log = RunLog(self.out, cfg.logging.tensorboard)
        self.original = self.layout.flatten(self.model).to(self.device).float()
        self.test = lambda: self.task.test_batches(cfg.data.eval_batch_size, self.device,
                                                   cfg.data.num_workers, cfg.data.max_eval_batches)

    def _check_stages(self) -> None:
        """What the stages still to run need, checked now rather than when a stage starts (a
        mistake found then would cost the stages before it): teachers load, feature maps exist."""
        first = 0 if self.resume_state is None else self.resume_state["stage_index"]
        for index, stage in enumerate(self.cfg.stages[first:], start=first):
            if stage.type != "distill":
                continue
            if stage.teacher is not None:  # kept (on the CPU) for its stage: read once
                self.checked_teachers[index] = load_teacher(stage.teacher, self.task, index)
            if stage.fmd_weight > 0:
                try:
                    feature_module_names(self.model, stage.feature_maps)
                except ValueError as exc:
                    raise ConfigError(f"stages.{index}.feature_maps: {exc}") from None

    def _evaluate(self, flat: Optional[torch.Tensor]) -> float:
        return accuracy(self.model, self.test(), self.layout, flat)

    # ------------------------------------------------------------------ run
    def run(self) -> dict:
        started = time.perf_counter()
        self._setup()
        cfg = self.cfg
        state = self.resume_state
        if state is not None:
            results = list(state["results"])
            original_accuracy = state["original_accuracy"]
            start_stage = state["stage_index"]
            previous = state.get("previous_output")
            previous = None if previous is None else previous.to(self.device)
            elapsed = state.get("elapsed", 0.0)
            if start_stage >= len(cfg.stages):  # the checkpoint of the last stage's end
                self.echo(f"{self.out}: the run is complete (all {len(cfg.stages)} stages); writing "
                          f"its outputs again")
            else:
                self.echo(f"resuming {self.out} at stage {start_stage} ({cfg.stages[start_stage].name}) "
                          f"step {state['step']}")
        else:
            results, previous, start_stage, elapsed = [], None, 0, 0.0
            original_accuracy = self._evaluate(None)
            self.echo(f"original network: {original_accuracy:.2f} % test accuracy "
                      f"({self.layout.num_layers} represented layers, {self.layout.num_kernels} "
                      f"kernels, {self.layout.num_weights} weights)")
            self.log.write({"event": "original", "accuracy": original_accuracy})
        self.original_accuracy = original_accuracy
        pred = None
        for index in range(start_stage, len(cfg.stages)):
            stage_state = state if (state is not None and state["stage_index"] == index) else None
            pred, result, previous = self._run_stage(index, pred, previous, results, stage_state,
                                                     elapsed_before=elapsed + time.perf_counter() - started)
            results.append(result)
            state = None
            if cfg.stages[index].cuda_graphs and self.device.type == "cuda":
                gc.collect()  # make_graphed_callables leaves a reference cycle: free the graphs' pool now
        if pred is None:  # resumed after the last stage: the final predictor is on disk
            pred = FastPredictor.load(self.out / "predictor.pt", map_location=self.device)
        total = elapsed + time.perf_counter() - started
        metrics = self._metrics(pred, results, total)
        write_outputs(self.out, metrics)
        self.log.write({"event": "done", **{k: metrics[k] for k in (
            "final_accuracy", "compression_ratio", "reconstruction_rmse")}})
        self.log.close()
        return metrics

    def _metrics(self, pred: FastPredictor, results: list, seconds: float) -> dict:
        last = results[-1]
        return {"recipe": self.cfg.recipe, "model": self.cfg.model.arch,
                "dataset": self.cfg.data.dataset, "device": str(self.device),
                "backend": backend_name(pred), "torch": torch.__version__,
                "layers": self.layout.num_layers, "kernels": self.layout.num_kernels,
                "represented_parameters": self.layout.num_weights,
                "predictor_parameters": pred.num_parameters,
                "original_accuracy": self.original_accuracy,
                "final_accuracy": last["accuracy"], "compression_ratio": last["compression_ratio"],
                "reconstruction_rmse": last["reconstruction_rmse"],
                "per_layer_rmse": last.get("per_layer_rmse"), "stages": [
                    {k: v for k, v in r.items() if k != "per_layer_rmse"} for r in results],
                "seconds": seconds}

    # ------------------------------------------------------------------ one stage
    def _run_stage(self, index: int, pred: Optional[FastPredictor], previous: Optional[torch.Tensor],
                   results: list, state: Optional[dict], elapsed_before: float):
        cfg, stage = self.cfg, self.cfg.stages[index]
        if pred is None or stage.predictor == "new":
            hidden = stage.hidden if stage.predictor == "new" else None
            if stage.predictor != "new" and state is not None:  # resumed: the saved predictor's width
                hidden = state["predictor"]["layers.0.weight"].shape[0]  # (an earlier stage's hidden)
            pred = setup.make_predictor(self.layout, cfg.predictor, hidden, cfg.seed + 1000 * index,
                                        self.device)
        # A checkpoint at step 0 was written at the previous stage's end: its predictor is where
        # this stage starts (unless it makes a new one), its optimiser and data states are the
        # previous stage's, not this one's.
        at_start = state is not None and state["step"] == 0
        if state is not None and not (at_start and stage.predictor == "new"):
            pred.load_state_dict({k: v.to(self.device) for k, v in state["predictor"].items()})
        target = previous if stage.target == "previous" else self.original
        self.predictor = pred  # the predictor being trained (for on_step hooks)
        pred.train()
        params = list(pred.parameters())
        optimizer = build_optimizer(params, stage.optim)
        stream = None
        if stage.type == "distill":
            if stage.inputs == "noise":
                stream = self.task.noise_stream(cfg.data.batch_size, self.device,
                                                cfg.seed + 17 * index, cfg.data.noise)
            else:
                stream = self.task.train_stream(cfg.data.batch_size, self.device, cfg.seed,
                                                cfg.data.num_workers, augment=cfg.data.augment)
        total = stage.steps or max(1, math.ceil(stage.epochs * stream.steps_per_epoch))
        scheduler = build_scheduler(optimizer, stage.optim, total)
        needs_rows = stage.type == "reconstruct" or stage.gradients == "sampled"
        sampler = None
        if needs_rows:
            norms = kernel_norms(self.layout, target) if stage.sampler == "random_weighted_batch" else None
            sampler = KernelSampler(self.layout, stage.weights_batch_size, stage.sampler,
                                    self.device, cfg.seed + 31 * index, norms)
        step = 0
        seconds_before = 0.0
        evaluations: list = []  # [step, test accuracy] of the stage's eval_every evaluations
        if state is not None and not at_start:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if sampler is not None and state.get("sampler") is not None:
                sampler.load_state_dict(state["sampler"])
            if stream is not None and state.get("stream") is not None:
                stream.load_state_dict(state["stream"])
            step = state["step"]
            seconds_before = state.get("stage_seconds", 0.0)
            evaluations = [list(e) for e in state.get("evaluations") or []]
        if state is not None:
            set_rng_state(state["rng"])

        what = f"stage {index} ({stage.name})"
        if stage.type == "reconstruct":
            objective = ReconstructionObjective(pred, target, stage.reconstruction_loss)
            # The capture's sample rows need only the right shape: drawing them from the sampler
            # would shift its stream, and a resumed run would then differ from an uninterrupted one.
            sample_rows = torch.zeros(sampler.batch_size, dtype=torch.long, device=self.device)
            compute = maybe_graphed(objective, (sample_rows,), stage.cuda_graphs, what) \
                if stage.cuda_graphs else objective
            eager = objective
        else:
            teacher = None
            if stage.teacher is not None:
                teacher = setup.frozen(self.checked_teachers.pop(index), self.device)
            names = feature_module_names(self.model, stage.feature_maps) if stage.fmd_weight > 0 else []
            eager = DistillationObjective(pred, target, self.model, teacher, stage, names)
            compute = None  # captured lazily, after the loss warm-up

        # What the checkpoint file holds now, as the messages of a stop report it: this stage's
        # starting point when a file exists (the previous stage's end, or the resumed state).
        saved = {"step": step if (self.out / CHECKPOINT_NAME).exists() else None}

        def kept() -> str:
            if saved["step"] is None:
                return "no checkpoint was written yet"
            return (f"the last checkpoint ({self.out / CHECKPOINT_NAME}, stage {index} step "
                    f"{saved['step']}) is kept")

        def after_divergence() -> str:
            change = f"Lower stages.{index}.optim.lr or set stages.{index}.optim.grad_clip"
            if saved["step"] == 0:  # the stage's start: its settings may change on --resume
                return f"{change}, then --resume (stage {index} starts again from the checkpoint)"
            if saved["step"] is None:
                return f"{change} and start again"
            return (f"{change} and start again with --overwrite (a --resume would continue this "
                    f"stage with its settings unchanged)")

        def checkpoint(next_step: int, stage_index: int = index, prev=previous, extra_results=()):
            saved["step"] = next_step if stage_index == index else None
            save_checkpoint(self.out / CHECKPOINT_NAME, config=to_dict(cfg), stage_index=stage_index,
                            step=next_step, results=list(results) + list(extra_results),
                            original_accuracy=self.original_accuracy, model_digest=self.model_digest,
                            predictor={k: v.detach().cpu() for k, v in pred.state_dict().items()},
                            optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                            sampler=None if sampler is None else sampler.state_dict(),
                            stream=None if stream is None else stream.state_dict(),
                            previous_output=None if prev is None else prev.detach().cpu(),
                            elapsed=elapsed_before + time.perf_counter() - t0,
                            stage_seconds=seconds_before + time.perf_counter() - t0,
                            last_loss=last_loss, evaluations=evaluations if stage_index == index else [],
                            meter=meter.state_dict() if stage_index == index else None)

        log_every, ckpt_every = cfg.logging.log_every, cfg.logging.checkpoint_every
        meter = StepMeter(self.device)
        if state is not None and not at_start and state.get("meter") is not None:
            meter.load_state_dict(state["meter"])  # the log interval the interruption cut
        last_good = step
        last_loss = None if state is None else state.get("last_loss")
        ctrl_c = _CtrlC()
        t0 = time.perf_counter()
        bar = progress_bar(total, step, f"[{index + 1}/{len(cfg.stages)}] {stage.name}",
                           cfg.logging.progress)
        try:
            ctrl_c.install()
            while step < total:
                rows = sampler.sample() if sampler is not None else None
                if stage.type == "reconstruct":
                    loss, parts = compute(rows)
                else:
                    x, _ = stream.next()
                    warm = step < stage.loss_warmup_steps
                    if warm or not stage.cuda_graphs:
                        loss, parts = eager(x, rows, warm)
                    else:
                        if compute is None:
                            loss = parts = None  # the warm-up steps' graph: not kept over the capture
                            dummy = rows if rows is not None else torch.zeros(1, dtype=torch.long,
                                                                              device=self.device)
                            if self.device.type == "cuda" and not GRAPHED_CALLABLES_THREAD_LOCAL:
                                stream.pause()  # torch < 2.14: no other thread may use CUDA meanwhile
                            compute = graphed_distillation(eager, (x, dummy), True, what)
                        loss, parts = compute(x, rows if rows is not None else dummy)
                optimizer_step(loss, params, optimizer, scheduler, stage.optim.grad_clip)
                meter.add(parts)
                step += 1
                bar.update(1)
                if self.on_step is not None:
                    self.on_step(index, step)
                if ctrl_c.requested:  # Ctrl-C arrived during the step: stop at its end
                    raise KeyboardInterrupt
                at_log = step % log_every == 0 or step == total
                at_ckpt = step % ckpt_every == 0 and step < total
                if at_log or at_ckpt:
                    means, bad = meter.read(params)
                    if bad:
                        raise TrainingDiverged(
                            f"{what}: the loss or the predictor's parameters became NaN or infinite "
                            f"between steps {last_good} and {step}; stopped, {kept()}. "
                            f"{after_divergence()}")
                    last_good = step
                    last_loss = means["loss"]
                    if at_log:
                        meter.reset()
                        bar.set_postfix(loss=f"{means['loss']:.4g}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
                        self.log.write({"stage": stage.name, "stage_index": index, "step": step,
                                        "lr": scheduler.get_last_lr()[0], **means},
                                       global_step=step)
                    if at_ckpt:
                        checkpoint(step)
                if stage.eval_every and step % stage.eval_every == 0 and step < total:
                    with torch.no_grad():
                        acc = self._evaluate(pred.decode_flat())
                    evaluations.append([step, acc])
                    self.log.write({"stage": stage.name, "stage_index": index, "step": step,
                                    "event": "eval", "accuracy": acc})
                    bar.write(f"  {stage.name} step {step}: test accuracy {acc:.2f} %")
        except KeyboardInterrupt:
            bar.close()
            if ctrl_c.hard:
                resume = "" if saved["step"] is None else f"; continue with {self.resume_command}"
                raise StageInterrupted(f"stopped at once in {what} (second Ctrl-C); {kept()}{resume}") from None
            means, bad = meter.read(params)
            if not bad:
                checkpoint(step)
                raise StageInterrupted(f"interrupted in {what} at step {step}; checkpoint written "
                                       f"to {self.out / CHECKPOINT_NAME}, continue with {self.resume_command}") from None
            raise StageInterrupted(f"interrupted in {what}; the loss or the parameters were not finite: "
                                   f"{kept()}") from None
        finally:
            ctrl_c.remove()
        if meter.count:  # resumed at the stage's last step: write the log its interruption cut
            means, _ = meter.read()  # (finite: the checkpoint was written)
            last_loss = means["loss"]
            self.log.write({"stage": stage.name, "stage_index": index, "step": step,
                            "lr": scheduler.get_last_lr()[0], **means}, global_step=step)
        bar.close()
        seconds = seconds_before + time.perf_counter() - t0
        pred.eval()
        with torch.no_grad():
            decoded = pred.decode_flat().detach().float()
        acc = self._evaluate(decoded)
        result = {"name": stage.name, "type": stage.type, "hidden": pred.hidden,
                  "accuracy": acc, "reconstruction_rmse": rmse(decoded, self.original),
                  "target_rmse": rmse(decoded, target),
                  "compression_ratio": pred.compression_ratio,
                  "predictor_parameters": pred.num_parameters, "steps": total,
                  "seconds": seconds, "final_loss": last_loss,
                  # NeRN reports the best of its test evaluations; fit's result is the final one
                  "evaluations": evaluations + [[total, acc]],
                  "per_layer_rmse": per_layer_rmse(decoded, self.original, self.layout)}
        self.echo(f"{stage.name}: test accuracy {acc:.2f} % (original {self.original_accuracy:.2f} %), "
                  f"compression ratio {pred.compression_ratio:.4f}, reconstruction RMSE "
                  f"{result['reconstruction_rmse']:.6f}, {seconds:.1f} s")
        self.log.write({"event": "stage_end", "stage_index": index,
                        **{k: v for k, v in result.items() if k != "per_layer_rmse"}})
        stages_dir = self.out / "stages"
        stages_dir.mkdir(exist_ok=True)
        save_predictor(pred, stages_dir / f"{index}-{stage.name}.pt", cfg, stage=stage.name,
                       accuracy=acc)
        save_predictor(pred, self.out / "predictor.pt", cfg, stage=stage.name, accuracy=acc)
        checkpoint(0, index + 1, decoded, [result])
        return pred, result, decoded

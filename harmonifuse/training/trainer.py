"""Batch-interleaved multi-task training, single process or several under torchrun (DDP, or FSDP:
``train.parallel``, training/sharding.py).

One loop runs the stages in turn (``stages.Stage``: the alignment stage, then the main stage).
Every step takes one batch of one task (or a mixed batch for the ablation); all ranks take the
same task at the same step, each its own shard, and DDP averages every stage's gradients. Only
rank 0 writes logs and checkpoints. Whether to stop (time budget, a signal to any one rank, early
stopping) is decided once for all ranks, so every rank leaves the loop at the same step.

No rank ever waits on a collective the others do not run: a rank whose whole batch was unreadable
still runs the step (a stand-in batch, its loss times zero); dev scoring is split over the ranks
under ddp and runs on every rank in step under fsdp; every prompt vector is computed before fsdp
shards the LLM. Each rank draws its own SpecAugment masks and dropout (seeded per rank and step).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import signal
import time
import zlib
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from harmonifuse.atomic import atomic_write_text
from harmonifuse.config import to_yaml
from harmonifuse.config.run import RunConfig
from harmonifuse.data.batch import MIXED_TASK, SpeechBatch
from harmonifuse.data.prompt_choice import PromptChoice
from harmonifuse.evaluation.evaluate import evaluate, evaluate_ctc
from harmonifuse.evaluation.metrics import dev_score
from harmonifuse.training.checkpoint import CheckpointManager, rng_state, set_rng_state
from harmonifuse.training.hardware import choose_precision, describe_hardware
from harmonifuse.training.loaders import RunData
from harmonifuse.training.logger import RunLogger
from harmonifuse.training.optim import lr_lambda, parameter_groups
from harmonifuse.training.sharding import Parallel, make_parallel
from harmonifuse.training.stages import Stage

log = logging.getLogger(__name__)


class Trainer:
    """``fit()`` trains ``model`` on ``data`` as ``config`` says; ``resume()`` first continues a checkpoint."""

    def __init__(self, config: RunConfig, model, data: RunData, *, rank: int = 0, world_size: int = 1,
                 progress: bool = True, parallel: Parallel | None = None) -> None:
        self.config, self.model, self.data = config, model, data
        self.rank, self.world_size = rank, world_size
        self.is_main = rank == 0
        self.progress = progress and self.is_main
        self.output_dir = Path(config.train.output_dir)
        self.device = model.llm.device  # where training/run.py put the model; every collective's tensors live here
        self._setup_memory()
        self._setup_precision()
        self._setup_prompt_vectors()  # before the LLM is sharded
        self.module = self._setup_parallel(parallel)  # before the optimisers: FSDP replaces the parameters
        self.stages = self._setup_stages()
        self._setup_bookkeeping()

    # -- setup --------------------------------------------------------------------------------------

    def _setup_memory(self) -> None:
        if self.config.train.gradient_checkpointing:
            log.info("gradient checkpointing in: %s", ", ".join(self.model.enable_gradient_checkpointing()))

    def _setup_precision(self) -> None:
        self.autocast_dtype = choose_precision(self.config.train.precision, self.device)
        if self.autocast_dtype is not None:  # bit-identical under autocast, without per-call weight casts
            self.model.llm.store_frozen_linears_in(self.autocast_dtype)

    def _setup_prompt_vectors(self) -> None:
        """Every prompt's vector (``model.tasks.prompts``, ``train_prompts``), now, on every rank.

        With ``model.prompt.vector: hidden_state`` a prompt's vector is a forward pass of the LLM,
        computed the first time the prompt appears; once fsdp has sharded the LLM that forward is a
        collective, and ranks drawing new phrasings at different steps would run different numbers
        of them. Under fsdp any other prompt is then refused by name instead."""
        tasks = self.config.model.tasks
        prompts = sorted({*tasks.prompts.values(), *(p for options in tasks.train_prompts.values() for p in options)})
        with torch.no_grad(), self._autocast():
            self.model.prompt_encoder(prompts)
        if self.config.train.parallel == "fsdp" and self.world_size > 1:
            self.model.prompt_encoder.fixed = ("under train.parallel fsdp every prompt vector is computed before the "
                                               "LLM is sharded, from model.tasks.prompts and model.tasks.train_prompts")

    def _setup_stages(self) -> list[Stage]:
        """The alignment stage (when ``align.max_steps``), then the main stage."""
        c = self.config
        stages = []
        if c.align.max_steps:  # fusion, gate, projector, the CTC scale and an unfrozen encoder: the LLM takes no part
            groups = [g for g in parameter_groups(self.model, c.optim, lr=c.align.lr) if g["name"] != "lora"]
            optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.98))
            schedule = lr_lambda(dataclasses.replace(c.optim, warmup_steps=c.align.warmup_steps), c.align.max_steps)
            stages.append(Stage("align", "align", self.data.align_loader, optimizer,
                                torch.optim.lr_scheduler.LambdaLR(optimizer, schedule), c.align.max_steps,
                                c.align.max_minutes, "stage", c.align.eval_every, self.evaluate_align))
        optimizer = torch.optim.AdamW(parameter_groups(self.model, c.optim), betas=(0.9, 0.98))
        stages.append(Stage("main", "answer", self.data.loader, optimizer,
                            torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(c.optim, c.train.max_steps)),
                            c.train.max_steps, c.train.max_minutes, "run", c.train.eval_every, self.evaluate_dev,
                            grad_accum=c.optim.grad_accum))
        return stages

    def _setup_parallel(self, parallel: Parallel | None):
        """What every stage's steps go through: the model itself, or (several processes) its DDP or FSDP
        wrapping by ``parallel``, by default the strategy ``train.parallel`` names (training/sharding.py)."""
        # the alignment stage leaves the LoRA adapters out of its graph, and HarmoniFuse never reads a trained
        # encoder's final layer norm: DDP must expect unused parameters then
        unused = self.config.align.max_steps > 0 or self.config.model.encoder.trainable
        self.parallel = parallel or make_parallel(self.config.train.parallel, self.world_size, self.device,
                                                  unused_parameters=unused)
        return self.parallel.wrap(self.model)

    def _setup_bookkeeping(self) -> None:
        tc, tasks = self.config.train, self.config.model.tasks
        self.prompt_choice = PromptChoice(tasks.prompts, tasks.train_prompts, seed=tc.seed)
        self.checkpoints = CheckpointManager(self.output_dir, keep_last=tc.keep_last)
        self.logger = RunLogger(self.output_dir, self.is_main)
        self.best_metric = -math.inf
        self.best_step = -1
        self.evals_since_best = 0
        self._saved_at: int | None = None
        self._stop_signal: int | None = None

    # -- state ---------------------------------------------------------------------------------------

    @property
    def main_stage(self) -> Stage:
        return self.stages[-1]

    @property
    def align_stage(self) -> Stage | None:
        return self.stages[0] if len(self.stages) > 1 else None

    @property
    def step(self) -> int:
        """Steps of the main stage."""
        return self.main_stage.step

    @property
    def total_seconds(self) -> float:
        """Training time of every stage: what ``train.max_minutes`` and the logs' minutes count."""
        return sum(stage.seconds for stage in self.stages)

    @property
    def total_steps(self) -> int:
        """Steps of every stage: what numbers the checkpoints, so the newest always sorts last."""
        return sum(stage.step for stage in self.stages)

    def state(self) -> dict[str, Any]:
        main = self.main_stage
        state = {"step": main.step, "train_seconds": main.seconds, "best_metric": self.best_metric,
                 "best_step": self.best_step, "evals_since_best": self.evals_since_best,
                 **main.loop_state(self.parallel, self.model), "rng": rng_state()}
        align = self.align_stage
        if align is not None:
            state["align"] = {"step": align.step, "seconds": align.seconds, "done": align.done,
                              **align.loop_state(self.parallel, self.model)}
        return state

    def save_checkpoint(self, *, force: bool = False) -> None:
        """Checkpoint every stage's state (once per step, unless ``force``: a stage just ended)."""
        if self._saved_at == self.total_steps and not force:
            return
        trained, state = self.parallel.trained_state(self.model), self.state()  # under fsdp: gathered by all ranks
        if self.is_main:
            self.checkpoints.save(self.total_steps, trained, state)
        if self.world_size > 1:
            dist.barrier()
        self._saved_at = self.total_steps

    def resume(self) -> bool:
        """Continue from the newest complete checkpoint in the output folder, if any."""
        found = self.checkpoints.load_latest()  # skips a damaged newest checkpoint, with a warning
        if found is None:
            self.logger.trim(lambda record: True)  # a run killed before its first checkpoint starts again
            return False
        latest, trained, state = found
        align_state = state.get("align")
        if (align_state is not None) != (self.align_stage is not None):
            raise ValueError(f"{latest} was written {'with' if align_state else 'without'} an alignment stage and "
                             f"this config has {'none' if align_state else 'one'} (align.max_steps); resume with "
                             f"the run's own config ({self.output_dir / 'config.yaml'})")
        self.parallel.load_trained(self.model, trained)
        main = self.main_stage
        main.load_loop_state(state, self.parallel, self.model)
        main.step, main.seconds = state["step"], state["train_seconds"]
        set_rng_state(state["rng"])
        self.best_metric, self.best_step = state["best_metric"], state["best_step"]
        self.evals_since_best = state["evals_since_best"]
        if align_state is not None:
            align = self.align_stage
            align.load_loop_state(align_state, self.parallel, self.model)
            align.step, align.seconds, align.done = align_state["step"], align_state["seconds"], align_state["done"]
        self._saved_at = self.total_steps
        # what the killed run logged after this checkpoint is done again: log it once, as a run never killed would
        steps = {stage.name: stage.step for stage in self.stages}
        self.logger.trim(lambda r: r.get("step", 0) > steps["align" if r.get("kind", "").startswith("align")
                                                            else "main"])
        log.warning("resumed from %s (step %d)", latest, main.step)
        return True

    # -- the loop -----------------------------------------------------------------------------------

    @staticmethod
    def _batches(loader):
        while True:
            for batch in loader:
                yield batch
            loader.set_epoch(loader.sampler.epoch + 1)

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _global_token_mean(self, out, stage: Stage, *, tokens: int | None = None) -> torch.Tensor:
        """Under DDP, rescale so the averaged gradient is that of the mean over *all* ranks' answer
        tokens, exactly what one process with the global batch computes. Auxiliary terms (CTC) and the
        alignment stage's loss are means over items, which DDP's averaging over equal shards already
        makes global. ``tokens``: what this rank adds to the count (0 for a stand-in batch)."""
        if self.world_size == 1 or stage.objective != "answer":
            return out.loss
        mine = out.num_tokens if tokens is None else tokens
        total = torch.tensor([float(mine)], device=self.device)
        dist.all_reduce(total)
        answer = out.answer_loss if out.answer_loss is not None else out.loss
        return answer * (mine * self.world_size / max(float(total), 1.0)) + (out.loss - answer)

    def _stand_in(self, batch: SpeechBatch, stage: Stage) -> SpeechBatch:
        """What a rank whose whole batch was skipped (``data.bad_samples: skip``) runs instead, its loss
        times zero: one second of quiet noise of the step's task, as the loader serves it (cached hidden
        states or a waveform). Skipping the step would leave the rank out of its collectives (DDP's
        buffer broadcast and gradient all-reduce, FSDP's gathers and reductions, the token count), and
        the other ranks' would pair with its next ones: a hang or silently wrong gradients. Through
        the wrapped model, with the step's own task, it takes part in every one and adds nothing."""
        tasks = stage.loader.sampler.tasks
        task = batch.task if batch.task != MIXED_TASK and batch.task in tasks else tasks[0]
        generator = torch.Generator().manual_seed(0)
        if self.data.cache is not None:
            encoder = self.model.encoder
            frames = 50
            hidden = 0.1 * torch.randn(encoder.num_hidden_states, 1, frames, encoder.hidden_size, generator=generator)
            inputs = {"hidden_states": hidden.half(), "frame_lengths": torch.tensor([frames])}
        else:
            inputs = {"waveforms": 0.01 * torch.randn(1, 16_000, generator=generator),
                      "wave_lengths": torch.tensor([16_000])}
        stand_in = SpeechBatch(task=task, tasks=[task], ids=["<stand-in>"],
                               targets=[self.config.model.tasks.emotion_labels[0]], **inputs)
        return stand_in.to(self.device)

    def _step_seed(self, stage: Stage) -> int:
        """The torch seed of a step on this rank, under several processes: each rank draws its own
        SpecAugment masks and dropout (seeding every rank alike would mask the same frames of
        different utterances), and a resumed run draws exactly what the uninterrupted one did."""
        return zlib.crc32(f"{self.config.train.seed}|{stage.name}|{stage.step}|{self.rank}".encode())

    def _optimizer_step(self, stage: Stage, record: dict) -> None:
        """Clip the gradients of the stage's parameters (norm into the log record), step, schedule."""
        clip = self.config.optim.clip_norm
        if clip > 0:
            params = [p for group in stage.optimizer.param_groups for p in group["params"]]
            record["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, clip))
        stage.optimizer.step()
        stage.scheduler.step()

    def _handle_signal(self, signum, frame) -> None:
        self._stop_signal = signum

    def fit(self) -> dict:
        """Run every unfinished stage in turn; returns the summary (also written to summary.json)."""
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.output_dir / "config.yaml", to_yaml(self.config))
        previous = {s: signal.signal(s, self._handle_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        self.model.train()
        stop_reason = "max_steps"
        for stage in self.stages:
            if stage.done:
                continue
            stop_reason = self._run_stage(stage)
            if stop_reason.startswith("signal") or stop_reason == "early_stop":
                break
            stage.done = True
            if stage is not self.main_stage:
                self.save_checkpoint(force=True)  # the next stage starts from here, even after a kill
        return self._finish(stop_reason, previous)

    def _out_of_time(self, stage: Stage) -> bool:
        seconds = stage.seconds if stage.budget == "stage" else self.total_seconds
        return bool(stage.max_minutes) and seconds / 60 >= stage.max_minutes

    def _stop_decision(self, stage: Stage) -> tuple[bool, int]:
        """(out of time, signal number or 0), the same on every rank.

        Each rank's own clock and signals, all-reduced with MAX (one 2-element all-reduce per step):
        ranks measure slightly different minutes and a signal may reach one rank only, and a rank
        that left the loop alone would leave the others waiting in their next collective.
        """
        flags = torch.tensor([float(self._out_of_time(stage)), float(self._stop_signal or 0)], device=self.device)
        if self.world_size > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        out_of_time, signum = flags.tolist()
        return bool(out_of_time), int(signum)

    def _run_stage(self, stage: Stage) -> str:
        """Train ``stage`` until its steps or minutes are spent, early stopping or a signal; returns why it stopped."""
        tc = self.config.train
        batches = self._batches(stage.loader)
        bar = tqdm(total=stage.max_steps, initial=stage.step, unit="step", dynamic_ncols=True,
                   desc="align (CTC)" if stage.objective == "align" else "train", disable=not self.progress)
        running: dict[str, list[float]] = {}
        stop_reason = "max_steps"
        try:
            while stage.step < stage.max_steps:
                start = time.perf_counter()
                stage.optimizer.zero_grad(set_to_none=True)
                if self.world_size > 1:
                    torch.manual_seed(self._step_seed(stage))
                items, record = 0, {}
                for micro in range(stage.grad_accum):
                    # pinned batches copy without blocking: the copy overlaps what the GPU still runs
                    batch = next(batches).to(self.device, non_blocking=stage.loader.pin_memory)
                    batch = self.prompt_choice(batch, stage=stage.name, step=stage.step)
                    items += len(batch)
                    sync = self.world_size == 1 or micro == stage.grad_accum - 1
                    empty = len(batch) == 0  # every sample was bad; under several processes it still joins in
                    if empty:
                        if self.world_size == 1:
                            continue
                        batch = self._stand_in(batch, stage)
                    accumulate = contextlib.nullcontext() if sync else self.parallel.no_sync(self.module)
                    with accumulate, self._autocast():
                        out = self.module(batch, objective=stage.objective)
                        loss = self._global_token_mean(out, stage, tokens=0 if empty else None) / stage.grad_accum
                        if empty:
                            loss = loss * 0.0
                    loss.backward()
                    if not empty:
                        self._track(stage, batch, out, running, record)
                self._optimizer_step(stage, record)
                stage.step += 1
                elapsed = time.perf_counter() - start
                stage.seconds += elapsed
                bar.update(1)
                if stage.step % tc.log_every == 0 or stage.step == 1:
                    losses = {name: sum(v) / len(v) for name, v in running.items() if v}
                    running = {}
                    record.update(kind=stage.log_kind, step=stage.step, minutes=self.total_seconds / 60,
                                  utt_per_s=items * self.world_size / elapsed, **losses,
                                  ctc_scale=float(self.model.ctc.scale),
                                  **{f"lr_{g['name']}": g["lr"] for g in stage.optimizer.param_groups})
                    self.logger.write(record)
                    bar.set_postfix({k: f"{v:.3f}" for k, v in losses.items()})
                out_of_time, signum = self._stop_decision(stage)
                if stage.step % stage.eval_every == 0 or stage.step == stage.max_steps or out_of_time:
                    if stage.evaluate():  # rank 0's verdict, broadcast
                        stop_reason = "early_stop"
                        break
                if stage.step % tc.save_every == 0:
                    self.save_checkpoint()
                if out_of_time:
                    stop_reason = "max_minutes"
                    break
                if signum:
                    stop_reason = f"signal {signum}"
                    break
        finally:
            bar.close()
        return stop_reason

    @staticmethod
    def _track(stage: Stage, batch, out, running: dict[str, list[float]], record: dict) -> None:
        """Collect a micro-batch's losses (averaged into the next log record) and what fusion and gate chose."""
        name = "loss_ctc" if stage.objective == "align" else f"loss_{batch.task}"
        running.setdefault(name, []).append(float(out.loss.detach()))
        if stage.objective == "answer" and out.ctc_loss is not None:
            running.setdefault("loss_ctc", []).append(float(out.ctc_loss.detach()))
        record.setdefault("tasks", []).append(batch.task)
        record[f"layer_weights_{batch.task}"] = out.layer_weights.detach().float().mean(0).tolist()
        if out.gate_mean is not None:
            record[f"gate_mean_{batch.task}"] = float(out.gate_mean.detach().float().mean())

    def _finish(self, stop_reason: str, previous_handlers: dict) -> dict:
        """Save the last steps, export a model if none was, write the summary."""
        for s, handler in previous_handlers.items():
            signal.signal(s, handler)
        self.save_checkpoint()  # never lose the last steps, whatever stopped the run
        if self.best_step < 0:  # the same on every rank (evaluate_dev broadcasts it)
            self.export(self.output_dir / "best")
        align = self.align_stage
        summary = {"steps": self.step, "minutes": self.total_seconds / 60, "stop_reason": stop_reason,
                   "align_steps": align.step if align else 0, "align_minutes": align.seconds / 60 if align else 0.0,
                   "best_step": self.best_step, "best_metric": self.best_metric,
                   "skipped": self.data.loader.skip_counts(),
                   "precision": "bf16 autocast" if self.autocast_dtype is not None else "float32",
                   "device": str(self.device), "hardware": describe_hardware(self.device)}
        if self.is_main:
            atomic_write_text(self.output_dir / "summary.json", json.dumps(summary, indent=2))
        self.logger.close()
        return summary

    # -- evaluation -----------------------------------------------------------------------------------

    def evaluate_align(self) -> bool:
        """The projector's greedy-CTC WER and CTC label-scoring UA on the dev subsets of the
        alignment stage's tasks (no LLM pass; every rank, as :meth:`evaluate_dev`). Never stops
        early: returns False."""
        tasks = [t for t in self.config.model.ctc.tasks if self.data.dev.get(t)]
        if not (self.is_main or self.parallel.evaluates_on_every_rank) or not tasks:
            return False
        with self.parallel.evaluation(self.model), self._autocast():
            metrics = evaluate_ctc(self.model, {t: self.data.dev[t] for t in tasks},
                                   batch_size=self.config.align.batch_size, cache=self.data.cache,
                                   progress=self.progress, share=self.parallel.evaluation_share())["metrics"]
        self.logger.write({"kind": "align_dev", "step": self.align_stage.step, "minutes": self.total_seconds / 60,
                           **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}})
        if self.is_main:
            tqdm.write(f"align step {self.align_stage.step}: CTC " + ", ".join(
                f"{k} {metrics[k]:.4f}" for k in ("wer", "cer", "ua") if k in metrics))
        return False

    def export(self, directory: Path) -> None:
        """Write the model folder on rank 0; every rank calls it (under fsdp the weights are gathered)."""
        trained = self.parallel.trained_state(self.model)
        if self.is_main:
            self.model.save_pretrained(directory, trained=trained)

    def evaluate_dev(self) -> bool:
        """Score the dev subset, export the best model; True when early stopping triggers.

        Every rank scores: under ddp each its share of the batches, the answers gathered (the same
        metrics as one process, and no rank idles in a collective for the whole scoring, which would
        outlast ``train.collective_timeout_minutes``); under fsdp all of them in step (a sharded
        model's forward is a collective). Rank 0's verdict counts."""
        tc = self.config.train
        verdict = torch.zeros(3, dtype=torch.float64, device=self.device)  # rank 0's: (improved, stop, value)
        if (self.is_main or self.parallel.evaluates_on_every_rank) and self.data.dev:
            with self.parallel.evaluation(self.model), self._autocast():
                result = evaluate(self.model, self.data.dev, batch_size=self.config.data.batch_size,
                                  cache=self.data.cache, progress=self.progress,
                                  share=self.parallel.evaluation_share())
            metrics = result["metrics"]
            metrics["score"] = dev_score(metrics)
            value = metrics[tc.metric] if tc.metric != "wer" else -metrics["wer"]
            self.logger.write({"kind": "dev", "step": self.step, "minutes": self.total_seconds / 60,
                               **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}})
            if self.is_main:
                tqdm.write(f"step {self.step}: " + ", ".join(f"{k} {metrics[k]:.4f}"
                                                            for k in ("wer", "cer", "wa", "ua") if k in metrics))
                improved = value > self.best_metric
                self.evals_since_best = 0 if improved else self.evals_since_best + 1
                stop = bool(tc.early_stop_patience) and self.evals_since_best >= tc.early_stop_patience
                verdict = torch.tensor([improved, stop, value], dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            dist.broadcast(verdict, 0)
        improved, stop, value = verdict.tolist()
        if improved:  # on every rank: under fsdp the export gathers the weights, and _finish reads best_step
            self.best_metric, self.best_step = value, self.step
            self.export(self.output_dir / "best")
        return bool(stop)

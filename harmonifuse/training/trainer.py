"""Batch-interleaved multi-task training, single process or DistributedDataParallel (torchrun).

Every step takes one batch of one task (or a mixed batch for the ablation); all ranks take the
same task at the same step, each its own shard. Only rank 0 writes logs and checkpoints.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import math
import os
import platform
import signal
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from tqdm import tqdm

from ..atomic import DiskFullError, atomic_write_text
from ..data.prompts import PromptChoice
from ..evaluation.evaluate import evaluate, evaluate_ctc
from .checkpoint import CheckpointManager, rng_state, set_rng_state
from .config import RunConfig
from .data import RunData

log = logging.getLogger(__name__)


# -- distributed --------------------------------------------------------------------------------------


def init_distributed() -> tuple[int, int]:
    """(rank, world size); initialises the process group under torchrun (gloo on CPU, nccl on CUDA)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# -- optimisation -------------------------------------------------------------------------------------


def parameter_groups(model, optim, lr: float | None = None) -> list[dict]:
    """HarmoniFuse parts, LoRA adapters and (if unfrozen) the encoder learn at their own rates;
    the fusion's layer weights apart at ``optim.fusion_lr_scale`` times the HarmoniFuse rate
    (``lr``, default ``optim.lr``) when that scale is not 1."""
    lr = optim.lr if lr is None else lr
    split_fusion = optim.fusion_lr_scale != 1.0  # else the groups of earlier checkpoints, for --resume
    groups: dict[str, list] = {"harmonifuse": [], "fusion": [], "lora": [], "encoder": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = ("lora" if name.startswith("llm.") else "encoder" if name.startswith("encoder.")
               else "fusion" if split_fusion and name.startswith("fusion.") else "harmonifuse")
        groups[key].append(p)
    rates = {"harmonifuse": lr, "fusion": lr * optim.fusion_lr_scale, "lora": optim.lora_lr,
             "encoder": optim.encoder_lr}
    return [{"name": k, "params": v, "lr": rates[k], "weight_decay": optim.weight_decay}
            for k, v in groups.items() if v]


def lr_lambda(optim, max_steps: int):
    def factor(step: int) -> float:
        if step < optim.warmup_steps:
            return (step + 1) / (optim.warmup_steps + 1)
        if optim.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - optim.warmup_steps) / max(1, max_steps - optim.warmup_steps))
        return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def choose_precision(requested: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast where it measures faster than float32 (CUDA, CPUs with bf16 matrix units)."""
    if requested == "fp32":
        return None
    if requested == "bf16" or device.type == "cuda":
        return torch.bfloat16
    a = torch.randn(1024, 1024)
    timings = {}
    for dtype in (torch.float32, torch.bfloat16):
        x = a.to(dtype)
        x @ x
        start = time.perf_counter()
        for _ in range(8):
            x @ x
        timings[dtype] = time.perf_counter() - start
    faster = timings[torch.bfloat16] < 0.7 * timings[torch.float32]
    log.info("matmul float32 %.3fs vs bf16 %.3fs: %s", timings[torch.float32], timings[torch.bfloat16],
             "bf16 autocast" if faster else "float32")
    return torch.bfloat16 if faster else None


def describe_hardware(device: torch.device) -> str:
    """What a run's minutes were measured on, e.g. 'AMD EPYC, AVX2, 2 threads' or 'cuda: NVIDIA A100'."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    name, flags = platform.processor() or platform.machine(), set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    units = torch.backends.cpu.get_cpu_capability() + "".join(
        f" + {name}" for flag, name in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX512-BF16")) if flag in flags)
    return f"{name}, {units}, {torch.get_num_threads()} threads"


# -- logging ------------------------------------------------------------------------------------------


class RunLogger:
    """JSONL (always) and TensorBoard (when installed) on rank 0; no-ops elsewhere."""

    def __init__(self, output_dir: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.file = None
        self.tb = None
        if enabled:
            output_dir.mkdir(parents=True, exist_ok=True)
            self.file = open(output_dir / "log.jsonl", "a", buffering=1)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(output_dir / "tensorboard"))
            except ImportError:  # tensorboard is optional for logging
                self.tb = None

    def trim(self, drop) -> None:
        """Cut the log (in place) at its first record for which ``drop(record)`` is true, or at its first
        incomplete line (a kill mid-write): a resumed run logs again what came after its checkpoint."""
        if not self.enabled:
            return
        self.file.flush()
        path = Path(self.file.name)
        offset = 0
        with open(path, "rb") as handle:
            for line in handle:
                try:
                    if not line.endswith(b"\n") or drop(json.loads(line)):
                        break
                except ValueError:
                    break
                offset += len(line)
        if offset < path.stat().st_size:
            os.truncate(path, offset)  # the file is open for appending: the next record lands here

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        try:
            self.file.write(json.dumps(record) + "\n")
        except OSError as error:
            if error.errno != errno.ENOSPC:
                raise
            raise DiskFullError(self.file.name, error, "the log lost its last record; the checkpoints are "
                                "intact and `--resume` continues from the newest") from error
        if self.tb is not None:
            step = record["step"]
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(f"{record.get('kind', 'train')}/{key}", value, step)
                elif isinstance(value, list) and value and isinstance(value[0], (int, float)):
                    for i, v in enumerate(value):
                        self.tb.add_scalar(f"{record.get('kind', 'train')}/{key}/{i}", v, step)

    def close(self) -> None:
        """Close the log files (again: a no-op)."""
        file, tb, self.file, self.tb = self.file, self.tb, None, None
        if file is not None:
            file.close()
        if tb is not None:
            tb.close()


# -- the trainer --------------------------------------------------------------------------------------


class Trainer:
    def __init__(self, config: RunConfig, model, data: RunData, *, rank: int = 0, world_size: int = 1,
                 progress: bool = True) -> None:
        self.config = config
        self.model = model
        self.data = data
        self.rank, self.world_size = rank, world_size
        self.is_main = rank == 0
        self.progress = progress and self.is_main
        self.output_dir = Path(config.train.output_dir)
        self.device = model.llm.device
        tc, oc = config.train, config.optim
        if tc.gradient_checkpointing:
            model.llm.model.gradient_checkpointing_enable()
            if hasattr(model.llm.model, "enable_input_require_grads"):
                model.llm.model.enable_input_require_grads()
        self.autocast_dtype = choose_precision(tc.precision, self.device)
        if self.autocast_dtype is not None:  # bit-identical under autocast, without per-call weight casts
            model.llm.store_frozen_linears_in(self.autocast_dtype)
        self.ddp = None  # wrapped when the main stage starts (see fit)
        self.optimizer = torch.optim.AdamW(parameter_groups(model, oc), betas=(0.9, 0.98))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(oc, tc.max_steps))
        ac = config.align
        self.align_optimizer = self.align_scheduler = None
        if ac.max_steps:  # fusion, gate, projector, the CTC scale and an unfrozen encoder: the LLM takes no part
            groups = [g for g in parameter_groups(model, oc, lr=ac.lr) if g["name"] != "lora"]
            self.align_optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.98))
            self.align_scheduler = torch.optim.lr_scheduler.LambdaLR(
                self.align_optimizer, lr_lambda(dataclasses.replace(oc, warmup_steps=ac.warmup_steps), ac.max_steps))
        self.align_step = 0
        self.align_seconds = 0.0
        self.align_done = not ac.max_steps
        tasks = config.model.tasks
        self.prompt_choice = PromptChoice(tasks.prompts, tasks.train_prompts, seed=tc.seed)
        self.checkpoints = CheckpointManager(self.output_dir, keep_last=tc.keep_last)
        self.logger = RunLogger(self.output_dir, self.is_main)
        self.step = 0
        self.train_seconds = 0.0
        self.best_metric = -math.inf
        self.best_step = -1
        self.evals_since_best = 0
        self._stop_signal: int | None = None

    # -- state ---------------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        state = {
            "step": self.step, "train_seconds": self.train_seconds, "best_metric": self.best_metric,
            "best_step": self.best_step, "evals_since_best": self.evals_since_best,
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "loader": self.data.loader.state_dict(), "rng": rng_state(),
        }
        if self.align_optimizer is not None:
            state["align"] = {"step": self.align_step, "seconds": self.align_seconds, "done": self.align_done,
                              "optimizer": self.align_optimizer.state_dict(),
                              "scheduler": self.align_scheduler.state_dict(),
                              "loader": self.data.align_loader.state_dict()}
        return state

    @property
    def total_seconds(self) -> float:
        """Training time of both stages: what ``train.max_minutes`` and the logs' minutes count."""
        return self.align_seconds + self.train_seconds

    def save_checkpoint(self) -> None:
        if self.is_main:  # numbered by steps of both stages, so the newest always sorts last
            self.checkpoints.save(self.align_step + self.step, self.model.trained_state_dict(), self.state())
        if self.world_size > 1:
            dist.barrier()

    def resume(self) -> bool:
        """Continue from the newest complete checkpoint in the output folder, if any."""
        found = self.checkpoints.load_latest()  # skips a damaged newest checkpoint, with a warning
        if found is None:
            self.logger.trim(lambda record: True)  # a run killed before its first checkpoint starts again
            return False
        latest, trained, state = found
        own = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in trained.items():
                own[name].copy_(tensor)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.data.loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
        for key in ("step", "train_seconds", "best_metric", "best_step", "evals_since_best"):
            setattr(self, key, state[key])
        align = state.get("align")
        if (align is not None) != (self.align_optimizer is not None):
            raise ValueError(f"{latest} was written {'with' if align else 'without'} an alignment stage and this "
                             f"config has {'none' if align else 'one'} (align.max_steps); resume with the run's own "
                             f"config ({self.output_dir / 'config.yaml'})")
        if align is not None:
            self.align_optimizer.load_state_dict(align["optimizer"])
            self.align_scheduler.load_state_dict(align["scheduler"])
            self.data.align_loader.load_state_dict(align["loader"])
            self.align_step, self.align_seconds, self.align_done = align["step"], align["seconds"], align["done"]
        # what the killed run logged after this checkpoint is done again: log it once, as a run never killed would
        self.logger.trim(lambda r: r.get("step", 0) > (self.align_step if r.get("kind", "").startswith("align")
                                                       else self.step))
        log.warning("resumed from %s (step %d)", latest, self.step)
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

    def _global_token_mean(self, out) -> torch.Tensor:
        """Under DDP, rescale so the averaged gradient is that of the mean over *all* ranks' answer
        tokens, exactly what one process with the global batch computes. Auxiliary terms (CTC) are
        means over items, which DDP's averaging over equal shards already makes global."""
        if self.world_size == 1:
            return out.loss
        total = torch.tensor([float(out.num_tokens)])
        dist.all_reduce(total)
        answer = out.answer_loss if out.answer_loss is not None else out.loss
        return answer * (out.num_tokens * self.world_size / float(total)) + (out.loss - answer)

    def _empty_step(self, sync: bool) -> None:
        """A zero-gradient step that still takes part in DDP's token count and gradient all-reduce."""
        if self.world_size == 1:
            return
        total = torch.zeros(1)
        dist.all_reduce(total)  # matches the token count all-reduce of the other ranks
        zero = sum(p.sum() for p in self.model.parameters() if p.requires_grad) * 0.0
        with contextlib.nullcontext() if sync else self.ddp.no_sync():
            zero.backward()

    def _optimizer_step(self, optimizer, scheduler, record: dict) -> None:
        """Clip the gradients of ``optimizer``'s parameters (norm into the log record), step, schedule."""
        clip = self.config.optim.clip_norm
        if clip > 0:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            record["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, clip))
        optimizer.step()
        scheduler.step()

    def _handle_signal(self, signum, frame) -> None:
        self._stop_signal = signum

    def fit(self) -> dict:
        tc, oc = self.config.train, self.config.optim
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.output_dir / "config.yaml", yaml.safe_dump(asdict(self.config), sort_keys=False))
        previous = {s: signal.signal(s, self._handle_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        self.model.train()
        if not self.align_done and not self.fit_align():
            return self._finish(f"signal {self._stop_signal}", previous)
        if self.world_size > 1 and self.ddp is None:
            # wrapped only now: the alignment stage runs outside DDP's forward and averages its
            # gradients by hand, so DDP's hooks need never meet its backward passes
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = DistributedDataParallel(self.model, find_unused_parameters=False)
        module = self.ddp or self.model
        batches = self._batches(self.data.loader)
        bar = tqdm(total=tc.max_steps, initial=self.step, desc="train", unit="step", disable=not self.progress,
                   dynamic_ncols=True)
        running: dict[str, list[float]] = {}
        stop_reason = "max_steps"
        try:
            while self.step < tc.max_steps:
                start = time.perf_counter()
                self.optimizer.zero_grad(set_to_none=True)
                items = 0
                record: dict[str, Any] = {}
                for micro in range(oc.grad_accum):
                    batch = self.prompt_choice(next(batches).to(self.device), stage="main", step=self.step)
                    items += len(batch)
                    sync = self.ddp is None or micro == oc.grad_accum - 1
                    if len(batch) == 0:  # every sample was bad; under DDP this rank must still join in
                        self._empty_step(sync)
                        continue
                    with (contextlib.nullcontext() if sync else self.ddp.no_sync()), self._autocast():
                        out = module(batch)
                        loss = self._global_token_mean(out) / oc.grad_accum
                    loss.backward()
                    running.setdefault(batch.task, []).append(float(out.loss.detach()))
                    if out.ctc_loss is not None:
                        running.setdefault("ctc", []).append(float(out.ctc_loss.detach()))
                    record.setdefault("tasks", []).append(batch.task)
                    record[f"layer_weights_{batch.task}"] = out.layer_weights.detach().float().mean(0).tolist()
                    if out.gate_mean is not None:
                        record[f"gate_mean_{batch.task}"] = float(out.gate_mean.detach().float().mean())
                self._optimizer_step(self.optimizer, self.scheduler, record)
                self.step += 1
                elapsed = time.perf_counter() - start
                self.train_seconds += elapsed
                bar.update(1)
                if self.step % tc.log_every == 0 or self.step == 1:
                    losses = {f"loss_{t}": sum(v) / len(v) for t, v in running.items() if v}
                    running = {}
                    record.update(kind="train", step=self.step, minutes=self.total_seconds / 60,
                                  utt_per_s=items * self.world_size / elapsed, **losses,
                                  **{f"lr_{g['name']}": g["lr"] for g in self.optimizer.param_groups})
                    self.logger.write(record)
                    bar.set_postfix({k: f"{v:.3f}" for k, v in losses.items()})
                if self.step % tc.eval_every == 0 or self.step == tc.max_steps:
                    if self.evaluate_dev():
                        stop_reason = "early_stop"
                        break
                if self.step % tc.save_every == 0:
                    self.save_checkpoint()
                if tc.max_minutes and self.total_seconds / 60 >= tc.max_minutes:
                    stop_reason = "max_minutes"
                    break
                if self._stop_signal is not None:
                    stop_reason = f"signal {self._stop_signal}"
                    break
        finally:
            bar.close()
        if stop_reason.startswith("max_minutes") and self.step % tc.eval_every != 0:
            self.evaluate_dev()  # the last steps may hold the best model
        return self._finish(stop_reason, previous)

    def _finish(self, stop_reason: str, previous_handlers: dict) -> dict:
        """Save the last steps, export a model if none was, write the summary."""
        for s, handler in previous_handlers.items():
            signal.signal(s, handler)
        if self.step % self.config.train.save_every != 0:
            self.save_checkpoint()  # never lose the last steps, whatever stopped the run
        if self.best_step < 0 and self.is_main:
            self.export(self.output_dir / "best")
        summary = {"steps": self.step, "minutes": self.total_seconds / 60, "stop_reason": stop_reason,
                   "align_steps": self.align_step, "align_minutes": self.align_seconds / 60,
                   "best_step": self.best_step, "best_metric": self.best_metric,
                   "skipped": self.data.loader.skip_counts(),
                   "precision": "bf16 autocast" if self.autocast_dtype is not None else "float32",
                   "hardware": describe_hardware(self.device)}
        if self.is_main:
            atomic_write_text(self.output_dir / "summary.json", json.dumps(summary, indent=2))
        self.logger.close()
        return summary

    # -- the alignment stage ----------------------------------------------------------------------

    def fit_align(self) -> bool:
        """Train fusion, gate and projector on the embedding-CTC alone; False if a signal stopped it."""
        ac, tc = self.config.align, self.config.train
        params = [p for group in self.align_optimizer.param_groups for p in group["params"]]
        batches = self._batches(self.data.align_loader)
        bar = tqdm(total=ac.max_steps, initial=self.align_step, desc="align (CTC)", unit="step",
                   disable=not self.progress, dynamic_ncols=True)
        losses: list[float] = []
        try:
            while self.align_step < ac.max_steps:
                start = time.perf_counter()
                self.align_optimizer.zero_grad(set_to_none=True)
                batch = self.prompt_choice(next(batches).to(self.device), stage="align", step=self.align_step)
                record: dict[str, Any] = {}
                if len(batch):
                    with self._autocast():
                        out = self.model.alignment_loss(batch)
                    out.loss.backward()
                    losses.append(float(out.loss.detach()))
                    record["tasks"] = [batch.task]
                    record[f"layer_weights_{batch.task}"] = out.layer_weights.detach().float().mean(0).tolist()
                    if out.gate_mean is not None:
                        record[f"gate_mean_{batch.task}"] = float(out.gate_mean.detach().float().mean())
                if self.world_size > 1:  # outside DDP's forward: average the gradients by hand
                    for p in params:
                        grad = p.grad if p.grad is not None else torch.zeros_like(p)
                        dist.all_reduce(grad)
                        p.grad = grad / self.world_size
                self._optimizer_step(self.align_optimizer, self.align_scheduler, record)
                self.align_step += 1
                elapsed = time.perf_counter() - start
                self.align_seconds += elapsed
                bar.update(1)
                if self.align_step % tc.log_every == 0 or self.align_step == 1:
                    loss = sum(losses) / len(losses) if losses else float("nan")
                    losses = []
                    record.update(kind="align", step=self.align_step, minutes=self.total_seconds / 60,
                                  loss_ctc=loss, ctc_scale=float(self.model.ctc.scale),
                                  lr=self.align_optimizer.param_groups[0]["lr"],
                                  utt_per_s=len(batch) * self.world_size / elapsed)
                    self.logger.write(record)
                    bar.set_postfix(loss_ctc=f"{loss:.3f}")
                out_of_time = bool(ac.max_minutes) and self.align_seconds / 60 >= ac.max_minutes
                if self.align_step % ac.eval_every == 0 or self.align_step == ac.max_steps or out_of_time:
                    self.evaluate_align()
                if self._stop_signal is not None:
                    self.save_checkpoint()
                    return False
                if out_of_time:
                    break
                if self.align_step % tc.save_every == 0:
                    self.save_checkpoint()
        finally:
            bar.close()
        self.align_done = True
        self.save_checkpoint()
        return True

    def evaluate_align(self) -> None:
        """The projector's greedy-CTC WER and CTC label-scoring UA on the dev subsets of the
        alignment stage's tasks (rank 0; no LLM pass)."""
        tasks = [t for t in self.config.model.projector.ctc_tasks if self.data.dev.get(t)]
        if not self.is_main or not tasks:
            return
        with self._autocast():
            metrics = evaluate_ctc(self.model, {t: self.data.dev[t] for t in tasks},
                                   batch_size=self.config.align.batch_size, cache=self.data.cache,
                                   progress=self.progress)["metrics"]
        self.logger.write({"kind": "align_dev", "step": self.align_step, "minutes": self.total_seconds / 60,
                           **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}})
        tqdm.write(f"align step {self.align_step}: CTC " + ", ".join(
            f"{k} {metrics[k]:.4f}" for k in ("wer", "cer", "ua") if k in metrics))

    def export(self, directory: Path) -> None:
        self.model.save_pretrained(directory)

    def evaluate_dev(self) -> bool:
        """Score the dev subset on rank 0, export the best model; True when early stopping triggers."""
        tc = self.config.train
        stop = torch.zeros(1)
        if self.is_main and self.data.dev:
            with self._autocast():
                result = evaluate(self.model, self.data.dev, batch_size=self.config.data.batch_size,
                                  cache=self.data.cache, progress=self.progress)
            metrics = result["metrics"]
            parts = []
            if "wer" in metrics:
                parts.append(1 - min(1.0, metrics["wer"]))
            if "ua" in metrics:
                parts.append(metrics["ua"])
            metrics["score"] = sum(parts) / len(parts)
            value = metrics[tc.metric] if tc.metric != "wer" else -metrics["wer"]
            self.logger.write({"kind": "dev", "step": self.step, "minutes": self.total_seconds / 60,
                               **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}})
            tqdm.write(f"step {self.step}: " + ", ".join(f"{k} {metrics[k]:.4f}" for k in ("wer", "cer", "wa", "ua")
                                                          if k in metrics))
            if value > self.best_metric:
                self.best_metric, self.best_step, self.evals_since_best = value, self.step, 0
                self.export(self.output_dir / "best")
            else:
                self.evals_since_best += 1
            if tc.early_stop_patience and self.evals_since_best >= tc.early_stop_patience:
                stop[0] = 1
        if self.world_size > 1:
            dist.broadcast(stop, 0)
        return bool(stop[0])

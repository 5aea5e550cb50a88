"""The Ray Train worker loop of a stage: cut the student (or resume it), then distill.

Every worker reads its own shard of the logit cache. Checkpoints (the engine's state, step, history,
per-rank RNG) are reported every `checkpoint_interval` steps, and a restarted worker group resumes
from the latest one at the exact data position. What depends on the strategy is the engine's
(`engines.py`); what every rank must agree on arrives decided, in the `StageRun`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from slimmoe.tasks.core.kernels import enable_gpu_numerics
from slimmoe.tasks.core.params import count_parameters
from slimmoe.tasks.core.runtime import progress_line, rank_and_world
from slimmoe.tasks.core.storage import write_json_atomic
from slimmoe.tasks.core.tracking import HISTORY_FILE, TRACKING_DIR, StepHistory, open_metric_logger
from slimmoe.tasks.data.formats import StageMetrics
from slimmoe.tasks.data.readers import LogitCacheError, open_logit_cache
from slimmoe.tasks.slimming.adaptive import EarlyStop, HeldOutKL
from slimmoe.tasks.slimming.engines import engine_class
from slimmoe.tasks.slimming.losses import distillation_loss, document_mask, per_token_kl
from slimmoe.tasks.slimming.moments import MOMENTS_FILE
from slimmoe.tasks.slimming.stage_run import StageRun, StageWorkerError, checkpoint_step
from slimmoe.tasks.slimming.student import cut_record


def nonfinite_ranks(loss: torch.Tensor, rank: int, world: int) -> list[int]:
    """The ranks whose `loss` is NaN or inf, the same list on every rank.

    A collective every rank issues for every micro-batch, before any backward: a rank that skipped its
    backward alone would leave the others inside FSDP's reduce-scatter (or DDP's all-reduce) until the
    process-group timeout."""
    flags = torch.zeros(world, dtype=torch.float32, device=loss.device)
    flags[rank] = 0.0 if bool(torch.isfinite(loss.detach()).all()) else 1.0
    if world > 1:
        dist.all_reduce(flags)
    return [r for r, bad in enumerate(flags.tolist()) if bad]


def report_every_s() -> float:
    """The least time between two live-metric reports: past two of Ray Train's health checks, which
    take one queued report each."""
    check = float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2"))
    return max(5.0, 2.5 * check)


def _memory_bytes(device) -> int:
    """The peak device memory this rank has allocated on a GPU; its resident memory now on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import psutil

    return psutil.Process().memory_info().rss


def _peak_rss_bytes() -> int:
    """This process's peak resident memory so far (Linux: VmHWM)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class MicroBatches:
    """This rank's micro-batches in a fixed order, wrapping into a new shuffled epoch when one ends."""

    def __init__(self, cache, micro_batch: int, rank: int, world: int, seed: int, start_micro: int):
        self.cache, self.micro_batch, self.rank, self.world, self.seed = cache, micro_batch, rank, world, seed
        self.per_epoch = cache.num_batches(micro_batch, world)
        self.epoch, start = divmod(start_micro, self.per_epoch)
        self._it = self._epoch_iter(start)

    def _epoch_iter(self, start: int):
        return iter(self.cache.iter_batches(self.micro_batch, rank=self.rank, world_size=self.world, shuffle=True,
                                            seed=self.seed, epoch=self.epoch, start_batch=start))

    def __next__(self) -> dict:
        try:
            return next(self._it)
        except StopIteration:
            self.epoch += 1
            self._it = self._epoch_iter(0)
            return next(self._it)


def train_loop(run: StageRun) -> None:
    """One worker: set up, distill for the planned steps (or until an early stop), save."""
    import ray.train.torch as rt

    loop = _StageLoop(run, rt.get_device())
    try:
        loop.setup()
        total = run.steps.total_steps
        while loop.state["step"] < total:
            loop.phase = "training"
            loop.make_due_cuts()
            if loop.stops_early():
                break
            parts, bad_ranks = loop.train_step()
            if bad_ranks:
                loop.stop_nonfinite(bad_ranks)  # every rank together; nothing is saved as final
                return
            loop.engine.step()
            loop.state["step"] += 1
            loop.state["tokens"] += run.steps.tokens_per_step
            loop.log(parts)
            if loop.state["step"] % run.cfg.checkpoint_interval == 0 and loop.state["step"] < total:
                loop.phase = "saving a checkpoint"
                loop.checkpoint()
        loop.phase = "saving the final model"
        loop.finish()
    except LogitCacheError:
        raise  # the driver names the damaged file from it
    except Exception as err:
        raise StageWorkerError.of(run.name, loop.rank, loop.world, loop.state["step"], loop.phase, err) from err
    finally:
        loop.close_tracking()  # the points logged so far reach the event file whatever ended the loop


class _StageLoop:
    def __init__(self, run: StageRun, device):
        self.run, self.cfg, self.device = run, run.cfg, device
        self.rank, self.world = rank_and_world()
        self.phase = "setting up"  # what a failure names
        self.engine_cls = engine_class(run.cfg.resolved_strategy())
        self.state = {"step": 0, "tokens": 0, "history": [], "resumed_from_step": None, "cuts_done": 1, "cuts": [],
                      "heldout": [], "stopped_early_at": None, "carried_optimizer": None}

    def setup(self) -> None:
        run = self.run
        run.pid_file(self.rank).parent.mkdir(parents=True, exist_ok=True)
        run.pid_file(self.rank).write_text(str(os.getpid()))
        torch.manual_seed(self.cfg.seed + self.rank)
        enable_gpu_numerics(self.device)
        self.cache = open_logit_cache(run.cache_dir, expect_teacher_fingerprint=run.teacher_fingerprint,
                                      expect_tokenizer_fingerprint=run.tokenizer_fingerprint)
        checkpoint = self._latest_checkpoint()
        self.phase = "cutting the student" if checkpoint is None else "resuming from its checkpoint"
        if checkpoint is None:
            student, moments = self._setup_model(None)
            self._setup_optimizer(student, moments, None)
        else:
            with checkpoint.as_directory() as ckpt:
                student, _ = self._setup_model(Path(ckpt))
                self._setup_optimizer(student, None, Path(ckpt))
                self._restore_loop(Path(ckpt))
        self._setup_data(student)

    def _latest_checkpoint(self):
        """The later of the checkpoint Ray Train registered and the one the stage's record names: a driver
        stopped before the controller's next poll leaves the record ahead (every rank reads the same file)."""
        import ray.train

        registered = ray.train.get_checkpoint()
        recorded = self.run.recorded_checkpoint()
        if recorded is None or (registered is not None and checkpoint_step(registered.path) >= recorded[0]):
            return registered
        return ray.train.Checkpoint.from_directory(str(recorded[1]))

    def _setup_model(self, ckpt: Path | None):
        """The student: cut from the stage's input on a fresh start (with the input's moments when they
        are carried), else as the checkpoint holds it."""
        if ckpt is None:
            return self.engine_cls.cut_student(self.run, self.cache, self.device, self.rank, self.world)
        return self.engine_cls.resume_student(self.run, ckpt, self.device), None

    def _setup_optimizer(self, student, moments: dict | None, ckpt: Path | None) -> None:
        # Carried moments are warm: a second warm-up would throw away what they know (same on resume).
        self.engine = self.engine_cls(student, self.cfg, self.device, self.run.steps.total_steps,
                                      warmup=not self.cfg.carry_optimizer)
        if ckpt is not None:
            self.engine.load(ckpt)
            return
        if moments is not None:
            self.state["carried_optimizer"] = self.engine.install_moments(moments)
        if not self.cfg.distill_only:
            self.state["cuts"].append(cut_record(self.run.cuts[0], 0, student))

    def _restore_loop(self, ckpt: Path) -> None:
        saved = torch.load(ckpt / "trainer_state.pt", weights_only=True)
        self.state.update(saved, history=json.loads((ckpt / "history.json").read_text()))
        rng = torch.load(ckpt / f"rng_rank{self.rank}.pt", weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if torch.cuda.is_available() and rng["cuda"].numel():
            torch.cuda.set_rng_state(rng["cuda"])
        self.state["resumed_from_step"] = self.state["step"]
        self._say(f"resumed from checkpoint at step {self.state['step']}/{self.run.steps.total_steps}")

    def _setup_data(self, student) -> None:
        cfg, cache = self.cfg, self.cache
        eos = cache.manifest.get("eos_token_id", getattr(student.config, "eos_token_id", None))
        self.eos = eos if isinstance(eos, int) else None
        self.batches = MicroBatches(cache, cfg.micro_batch, self.rank, self.world, cfg.seed,
                                    self.state["step"] * cfg.grad_accum)
        self.engine.model.train()
        self.early_stop, self.heldout = None, None
        if cfg.early_stop_min_improvement is not None:
            self.early_stop = EarlyStop(cfg.early_stop_min_improvement, cfg.early_stop_window_tokens,
                                        self.run.steps.tokens_per_step, cfg.early_stop_min_tokens)
            self.heldout = HeldOutKL(open_logit_cache(self.run.heldout_cache_dir), cfg.early_stop_rows, self.rank,
                                     self.world, cfg.micro_batch)
        self.t_log, self.tokens_at_log = time.time(), self.state["tokens"]
        self.t_report = -math.inf
        self.tracker, self.history = None, None
        if self.rank == 0:
            run_id = hashlib.sha256(str(self.run.work_dir).encode()).hexdigest()[:16]
            self.tracker = open_metric_logger(cfg.tracking, self.run.work_dir / TRACKING_DIR, self.run.name, run_id,
                                              self.state["step"])
            self.history = StepHistory(self.run.work_dir / HISTORY_FILE, self.state["resumed_from_step"])

    # -- during training --------------------------------------------------------------------------

    def make_due_cuts(self) -> None:
        """The inner cuts of a gradual stage whose step has come (a resumed stage makes only those left)."""
        cuts, state = self.run.cuts, self.state
        while state["cuts_done"] < len(cuts) and state["step"] >= cuts[state["cuts_done"]].step:
            cut = cuts[state["cuts_done"]]
            self.engine = self.engine.recut(self.run, self.cache, self.rank, self.world, cut, state["cuts_done"],
                                            state["step"])
            record = cut_record(cut, state["step"], self.engine.module)
            state["cuts"].append(record)
            state["cuts_done"] += 1
            self._say(f"cut {state['cuts_done']}/{len(cuts)} at step {state['step']}: "
                      f"{record['params_after']:,} parameters")

    def stops_early(self) -> bool:
        """Measure the held-out KL when a window is due (once per step) and decide, alike on every rank."""
        state, early_stop = self.state, self.early_stop
        if early_stop is None or not early_stop.due(state["step"]) or \
                (state["heldout"] and state["heldout"][-1]["step"] == state["step"]):
            return False
        state["heldout"].append({"step": state["step"], "tokens": state["tokens"],
                                 "heldout_kl": round(self.heldout(self.engine.module, self.device), 6)})
        if not early_stop.decide(state["heldout"]):
            return False
        state["stopped_early_at"] = state["step"]
        c = state["heldout"][-1]
        self._say(f"held-out KL improved {c['improvement']:.2%} on the best earlier check over the last "
                  f"{early_stop.window_steps} steps (< {self.cfg.early_stop_min_improvement:.2%}): stopping at step {state['step']}/"
                  f"{self.run.steps.total_steps}")
        return True

    def train_step(self) -> tuple[dict, list[int]]:
        """Forward and backward over one step's micro-batches: (the mean loss parts, the ranks whose loss
        was not finite; empty when every micro-batch of every rank was)."""
        cfg = self.cfg
        parts_acc: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            batch = {k: v.to(self.device) for k, v in next(self.batches).items()}
            logits, loss, parts = self._loss_step(batch)
            bad_ranks = nonfinite_ranks(loss, self.rank, self.world)
            if bad_ranks:
                return parts_acc, bad_ranks
            self.engine.backward(loss, last_micro=micro == cfg.grad_accum - 1)
            parts["loss"] = float(loss.detach())
            if cfg.temperature != 1.0:
                with torch.no_grad():
                    parts["kl"] = float(per_token_kl(logits.detach(), batch["topk_ids"], batch["topk_logprobs"],
                                                     batch["rest_logprob"], chunk_tokens="auto").mean())
            else:
                parts["kl"] = parts["kd"]
            for k, v in parts.items():
                parts_acc[k] = parts_acc.get(k, 0.0) + v / cfg.grad_accum
        return parts_acc, []

    def _loss_step(self, batch: dict):
        cfg = self.cfg
        mask = document_mask(batch["input_ids"], self.eos) if cfg.mask_document_boundaries else None
        logits = self.engine.forward(batch["input_ids"])
        loss, parts = distillation_loss(logits, batch["input_ids"], batch["topk_ids"], batch["topk_logprobs"],
                                        batch["rest_logprob"], cfg.temperature, cfg.next_token_weight, mask)
        return logits, loss, parts

    def stop_nonfinite(self, bad_ranks: list[int]) -> None:
        import ray.train

        # The driver raises with the step and the ranks.
        if self.rank == 0:
            write_json_atomic(self.run.nonfinite_file, {"step": self.state["step"] + 1, "ranks": bad_ranks,
                                                        "world": self.world})
        ray.train.report({"nonfinite_step": self.state["step"] + 1, "stage": self.run.name})

    def log(self, parts: dict) -> None:
        state, steps = self.state, self.run.steps
        if state["step"] % self.cfg.log_interval != 0 and state["step"] != steps.total_steps:
            return
        now = time.time()
        tps = (state["tokens"] - self.tokens_at_log) / max(now - self.t_log, 1e-9)
        self.t_log, self.tokens_at_log = now, state["tokens"]
        row = {"step": state["step"], "tokens": state["tokens"], "lr": self.engine.lr(), "tokens_per_s": round(tps, 1),
               **{k: round(v, 6) for k, v in parts.items()}}
        norm = self.engine.grad_norm()
        if norm is not None:
            row["grad_norm"] = round(norm, 6)
        row["memory_gb"] = round(_memory_bytes(self.device) / 1e9, 3)
        state["history"].append(row)
        if self._report_due(now):
            import ray.train

            # Every rank reports (a report is collective); the row is rank 0's, as in the log.
            ray.train.report({**row, "stage": self.run.name})
        if self.rank == 0:
            write_json_atomic(self.run.progress_file, row)
            self.history.append(row)
            self.tracker.log(state["step"], {k: v for k, v in row.items() if k != "step"})
            eta = (steps.total_steps - state["step"]) * steps.tokens_per_step / max(tps, 1e-9)
            self._say(f"step {state['step']}/{steps.total_steps} tokens {state['tokens']}/{steps.planned_tokens} "
                      f"loss {row['loss']:.4f} kl {row['kl']:.4f} tok/s {tps:.0f} eta {eta:.0f}s")

    def _report_due(self, now: float) -> bool:
        """Whether this logging step's row goes to `ray.train.report`, the same answer on every rank.

        A worker's report waits in a queue of one until Ray Train's controller takes it, which it does
        once per health check (every 2 s by default): a report per logging step of a fast stage would
        stall training there. So the rows go at most every `report_every_s()` seconds (every row still
        reaches history.jsonl and the tracker), on rank 0's clock, which every rank follows."""
        due = torch.tensor([1.0 if now - self.t_report >= report_every_s() else 0.0], device=self.device)
        if self.world > 1:
            dist.broadcast(due, src=0)
        if not bool(due.item()):
            return False
        self.t_report = now
        return True

    def checkpoint(self) -> None:
        import ray.train

        state, rank = self.state, self.rank
        tmp = Path(tempfile.mkdtemp(prefix=f"slimmoe-ckpt-r{rank}-"))
        if rank == 0:
            torch.save({k: v for k, v in state.items() if k != "history"}, tmp / "trainer_state.pt")
            (tmp / "history.json").write_text(json.dumps(state["history"]))
        torch.save({"cpu": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.empty(0, dtype=torch.uint8)},
                   tmp / f"rng_rank{rank}.pt")
        self.engine.save(tmp, rank)
        ray.train.report({"step": state["step"], "tokens": state["tokens"], "stage": self.run.name},
                         checkpoint=ray.train.Checkpoint.from_directory(str(tmp)),
                         checkpoint_dir_name=self.run.checkpoint_dir(state["step"]).name)
        shutil.rmtree(tmp, ignore_errors=True)  # uploaded synchronously by now
        if self.world > 1:
            dist.barrier()  # every rank's upload is complete before the record names the checkpoint
        if rank == 0:
            write_json_atomic(self.run.checkpoint_record, {"step": state["step"]})
            self._say(f"checkpoint of step {state['step']} saved")

    # -- the end ----------------------------------------------------------------------------------

    def finish(self) -> None:
        import ray.train

        run, rank = self.run, self.rank
        run.record_memory(rank, peak_rss_bytes=_peak_rss_bytes())
        if self.world > 1:
            dist.barrier()  # every rank's record is on disk before rank 0 collects them
        self.engine.save_final(run, rank)
        if rank == 0:
            self.close_tracking()
            if self.cfg.keep_optimizer_state:
                self.engine.save_moments(run.final_dir / MOMENTS_FILE)
            write_json_atomic(run.metrics_file, self._metrics())
        ray.train.report({"step": self.state["step"], "tokens": self.state["tokens"], "stage": run.name, "done": True})

    def _metrics(self) -> dict:
        run, cfg, state = self.run, self.cfg, self.state
        prepare = json.loads(run.prepare_file.read_text())
        metrics = {"stage": run.name, "steps": asdict(run.steps), "steps_done": state["step"],
                   "tokens_seen": state["tokens"], "resumed_from_step": state["resumed_from_step"],
                   "history": state["history"], "params_after": count_parameters(self.engine.module),
                   "config": cfg.model_dump(), **prepare, "memory_per_rank": run.memory_records(),
                   # What the schedule options did; the next stage inherits the unspent tokens.
                   "cuts": state["cuts"], "carried_optimizer": state["carried_optimizer"],
                   "unspent_tokens": run.steps.planned_tokens - state["tokens"]
                   if state["stopped_early_at"] is not None else 0}
        if self.early_stop is not None:
            metrics["early_stop"] = {"min_improvement": cfg.early_stop_min_improvement,
                                     "window_steps": self.early_stop.window_steps, "rows": cfg.early_stop_rows,
                                     "checks": state["heldout"], "stopped_at_step": state["stopped_early_at"]}
        return StageMetrics(**metrics).model_dump(mode="json")

    def close_tracking(self) -> None:
        if getattr(self, "tracker", None) is not None:
            self.tracker.close()
            self.tracker = None

    def _say(self, message: str) -> None:
        if self.rank == 0:
            progress_line(f"[{self.run.name}] {message}")

"""`zoo train`: the training loop (pretrain or finetune) with checkpoints, resume and data-parallel ranks.

One optimizer step = `grad_accum` micro-batches per rank (forward+backward into fp32 accumulators), then one
all-reduce + norm graph and one AdamW graph. Rows are read in file order (the reference does not shuffle); each
step takes the next `batch_size * grad_accum * ranks` rows, so a run's data position is one integer and training on
N ranks sees exactly the rows one process would with an N-times larger batch.

Checkpoints (`checkpoint-<step>/`: model.safetensors, optimizer.safetensors, state.json) are written to a
temporary folder and renamed into place, so a run killed mid-save leaves the previous checkpoint intact. Ctrl-C
saves and exits. Under data parallel rank 0 writes them while the other ranks wait (`ranks.RankSync`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from registry_spec.atomic import atomic_dir, write_jsonl
from registry_spec.errors import InputError
from registry_spec.specs import TrainResult

from ..model.config import GPTBigCodeConfig
from ..model.runtime import interrupts_deferred
from ..weights import load_params, save_params
from .preprocess import COLUMNS, read_mindrecord
from .ranks import RankSync
from .run_config import TrainSettings

CKPT_PREFIX = "checkpoint-"
# what a checkpoint folder holds (.ckpt: written before 0.9)
CKPT_FILES = {"model.safetensors", "optimizer.safetensors", "state.json", "model.ckpt", "optimizer.ckpt"}
StepCallback = Callable[[dict], None]


# ------------------------------------------------------------------------------------------------- distribution
def init_parallel(settings: TrainSettings) -> tuple[int, int]:
    """(rank, world size). Data parallel runs under `msrun`; model/pipeline parallel need Ascend."""
    import mindspore as ms

    p = settings.parallel
    if p.model_parallel > 1 or p.pipeline_stage > 1 or p.optimizer_shard:
        raise InputError("model/pipeline parallelism and optimizer sharding are not implemented in this plugin yet",
                         "use data_parallel only (launched with msrun); see the README's training section")
    launched = "MS_WORKER_NUM" in os.environ or "RANK_SIZE" in os.environ
    if p.data_parallel == 1 and not launched:
        return 0, 1
    from mindspore.communication import get_group_size, get_rank, init

    if not launched:
        raise InputError(f"data_parallel={p.data_parallel} needs one process per rank",
                         f"launch with `msrun --worker_num={p.data_parallel} --local_worker_num={p.data_parallel} "
                         "$(which zoo) train ...`")
    if os.environ.get("MS_ROLE") == "MS_WORKER":
        # a collective on MindSpore's CPU backend gives up after MS_NODE_TIMEOUT s (default 30) of waiting for a
        # peer; a rank compiling while another loads its graphs from the compile cache, or a slow resume read, takes
        # longer. 10 minutes, as torch.distributed's NCCL default; a rank that dies still ends the run at once (msrun
        # kills the others). The workers' setting is the one the collectives read (measured); the scheduler keeps
        # MindSpore's own.
        os.environ.setdefault("MS_NODE_TIMEOUT", "600")
    init()
    rank, size = get_rank(), get_group_size()
    if size != p.data_parallel:
        raise InputError(f"data_parallel={p.data_parallel} but {size} processes were launched",
                         "make --worker_num equal the data_parallel degree")
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True,
                                 device_num=size)
    return rank, size


# --------------------------------------------------------------------------------------------------------- data
class RowReader:
    """Batches of a preprocessed MindRecord in file order, from any position, for one data-parallel rank."""

    def __init__(self, path: Path, batch_size: int, rank: int, world: int, seq_length: int | None) -> None:
        self.path, self.batch, self.rank, self.world = path, batch_size, rank, world
        self.rows, width = read_mindrecord(path)
        if seq_length is not None and seq_length + 1 > width:
            raise InputError(f"--seq-length {seq_length} needs rows of {seq_length + 1} tokens but {path} has "
                             f"{width}", f"preprocess again with --seq-length {seq_length}, or omit --seq-length")
        self.width = width if seq_length is None else seq_length + 1
        self.global_batch = batch_size * world
        if self.rows < self.global_batch:
            raise InputError(f"{path} has {self.rows} rows, fewer than one global batch ({self.global_batch})",
                             "lower --batch-size or add data")

    @property
    def micro_batches_per_epoch(self) -> int:
        return self.rows // self.global_batch

    def batches(self, start_micro: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """This rank's micro-batches, the epoch's micro-batch `start_micro` first, then following epochs."""
        import mindspore.dataset as ds

        while True:
            order: list[int] = []
            for mb in range(start_micro, self.micro_batches_per_epoch):
                first = mb * self.global_batch + self.rank * self.batch
                order.extend(range(first, first + self.batch))
            if order:
                data = ds.MindDataset(str(self.path), columns_list=list(COLUMNS), sampler=ds.SubsetSampler(order))
                data = data.batch(self.batch, drop_remainder=True)
                for ids, labels in data.create_tuple_iterator(output_numpy=True, num_epochs=1):
                    yield ids[:, : self.width].astype(np.int32), labels[:, : self.width].astype(np.int32)
            start_micro = 0


# --------------------------------------------------------------------------------------------------- checkpoints
def checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a folder only gets its final name once fully written)."""
    found = [p for p in output_dir.glob(CKPT_PREFIX + "*") if p.is_dir() and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CKPT_PREFIX):]))


def is_checkpoint(folder: Path) -> bool:
    """A folder `save` wrote (a resumed run that ends at its checkpoint's step saves it again)."""
    return (folder / "state.json").is_file() and {p.name for p in folder.iterdir()} <= CKPT_FILES


def _checkpoint_file(folder: Path, stem: str) -> Path:
    """`stem`.safetensors, or the .ckpt a run before 0.9 wrote."""
    new = folder / f"{stem}.safetensors"
    return new if new.is_file() or not (folder / f"{stem}.ckpt").is_file() else folder / f"{stem}.ckpt"


# ------------------------------------------------------------------------------------------------------ trainer
class Trainer:
    def __init__(self, settings: TrainSettings, config: GPTBigCodeConfig, model_name: str, pad_token_id: int,
                 progress: bool = True) -> None:
        from mindspore import ParameterTuple, nn

        from ..model.memory import check, training_plan
        from ..model.runtime import build_model, init_mindspore
        from .optim import AccumulateGrads, CausalLMLoss, ClearGrads, GradStats, LossScaler, fp32_zeros

        earlier = checkpoints(settings.output_dir)
        if earlier and not settings.resume:  # a fresh run there would mix its checkpoints with these
            raise InputError(f"{settings.output_dir} holds checkpoints of an earlier run "
                             f"({', '.join(p.name for p in earlier[-3:])})",
                             "continue that run with --resume, or train into a new --output-dir")
        ms = init_mindspore()
        self.s, self.config, self.progress = settings, config, progress
        self.rank, self.world = init_parallel(settings)
        self.launcher = os.getppid()  # msrun, under data parallel: its exit stops the ranks
        self.reader = RowReader(settings.data, settings.batch_size, self.rank, self.world, settings.seq_length)
        seq = self.reader.width - 1
        if seq > config.n_positions:
            raise InputError(f"rows of {seq} tokens exceed the model's {config.n_positions} positions",
                             "preprocess with a smaller --seq-length")
        check(training_plan(config, settings.precision, settings.batch_size, seq), "zoo train",
              [*(["--precision fp16"] if settings.precision == "fp32" else []),
               "a smaller --batch-size with a larger --grad-accum (same rows per step)", "a shorter --seq-length",
               "data parallel over more ranks (msrun) does not split the model; LoRA and model parallel: not "
               "available yet"])
        found = earlier[-1:]
        self.resume_from = found[0] if found else None
        self.resume_state = json.loads((found[0] / "state.json").read_text()) if found else {}
        # a resumed run's weights are its checkpoint's: no random init or base weights only to be overwritten
        weights = _checkpoint_file(self.resume_from, "model") if self.resume_from else settings.weights
        self.model = build_model(model_name, config, weights, settings.precision, seed=settings.seed,
                                 allow_random=settings.mode == "pretrain", map_files=False)
        self.model.set_train(True)
        recorded = self.resume_state.get("numerics", {})  # what the checkpoint's run chose: a resume reuses it
        from ..kernels.choices import rank0_choices
        from ..kernels.training import TrainingKernels

        agree = (lambda chosen: rank0_choices(chosen, self.rank)) if self.world > 1 else None
        kernels = TrainingKernels(self.model, settings.batch_size * seq, recorded, agree)
        self.numerics = kernels.numerics  # saved with every checkpoint
        if self.rank == 0:
            for change in kernels.changes(recorded):
                print(f"note: resuming in {settings.output_dir}: {change}; the run goes on, but no longer "
                      "bit-exact with an uninterrupted one", file=sys.stderr)
        if settings.parallel.recompute:  # activation checkpointing per block: memory for compute, same numbers
            if ms.get_context("device_target") == "CPU" and self.rank == 0:
                print("note: recompute raises zoo train's peak memory on MindSpore's CPU backend instead of "
                      "lowering it (+0.4 to +1.1 GiB at tiny_starcoder, benchmarks/RESULTS.md); it is meant for "
                      "Ascend", file=sys.stderr)
            for block in self.model.transformer.h:
                block.recompute()
        self.params = ParameterTuple(self.model.trainable_params())
        self.accum = fp32_zeros(self.params, "accum")
        reducer = nn.DistributedGradReducer(self.accum, mean=True, degree=self.world) if self.world > 1 else None
        self.accumulate = AccumulateGrads(CausalLMLoss(self.model, pad_token_id, kernels.nll), self.params,
                                          self.accum, overwrite=settings.grad_accum == 1)
        self.stats = GradStats(self.accum, reducer, kernels.norm)
        self.clear = ClearGrads(self.accum)
        self.adamw = kernels.adamw(self.params, self.accum, settings.beta1, settings.beta2, settings.eps,
                                   settings.weight_decay)
        self.scaler = LossScaler(scale=settings.loss_scale if settings.precision == "fp16" else 1.0,
                                 factor=settings.loss_scale_factor, window=settings.loss_scale_window,
                                 dynamic=settings.precision == "fp16")
        self.sync = RankSync(self.world) if self.world > 1 else None
        steps_per_epoch = self.reader.micro_batches_per_epoch // settings.grad_accum
        if steps_per_epoch == 0:
            raise InputError(f"{settings.data} has too few rows for one step of {settings.batch_size} x "
                             f"{settings.grad_accum} x {self.world} rows", "lower --batch-size or --grad-accum")
        self.total_steps = settings.max_steps or settings.epochs * steps_per_epoch
        self.step, self.adam_step, self.micro_position = 0, 0, 0

    # ------------------------------------------------------------------------------------------------ state
    def optimizer_params(self) -> list:
        return list(self.adamw.m) + list(self.adamw.v) + list(self.adamw.master)

    def state(self) -> dict:
        return {"step": self.step, "adam_step": self.adam_step, "micro_position": self.micro_position,
                "total_steps": self.total_steps, "loss_scale": self.scaler.scale, "good_steps": self.scaler.good_steps,
                "world": self.world, "rows": self.reader.rows, "width": self.reader.width,
                "numerics": self.numerics, "settings": json.loads(self.s.model_dump_json())}

    def save(self, together: bool = True) -> Path:
        """Rank 0 writes the step's checkpoint. Under data parallel every rank calls this at the same point and
        returns once it is written (`together`; not when a second signal stopped one rank mid-step)."""
        out = self.s.output_dir / f"{CKPT_PREFIX}{self.step}"
        sync = self.sync if together else None
        if self.rank == 0:
            if sync:
                sync.writing()
            tick = sync.tick if sync else (lambda _nbytes: None)
            every = sync.flush_bytes if sync else None
            with atomic_dir(out, is_checkpoint) as tmp:
                save_params(list(self.params), tmp / "model.safetensors", done=tick, sync_every=every)
                save_params(self.optimizer_params(), tmp / "optimizer.safetensors", done=tick, sync_every=every)
                (tmp / "state.json").write_text(json.dumps(self.state(), indent=2))
            for old in checkpoints(self.s.output_dir)[: -self.s.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
            if sync:
                sync.written()
        elif sync:
            sync.wait_for_rank0()
        return out

    def restore(self) -> None:
        """The resumed checkpoint's optimizer state and position, after checking that the run's layout matches
        it (the model's parameters came from it when the trainer was built)."""
        ckpt, state = self.resume_from, self.resume_state
        for key, mine in (("rows", self.reader.rows), ("width", self.reader.width), ("world", self.world)):
            if state[key] != mine:
                raise InputError(f"cannot resume from {ckpt}: it was trained with {key}={state[key]}, this run has "
                                 f"{mine}", "resume with the same data and launch layout, or use a new --output-dir")
        saved = state["settings"]
        for key in ("batch_size", "grad_accum"):
            if saved[key] != getattr(self.s, key):
                raise InputError(f"cannot resume from {ckpt}: {key} was {saved[key]}, now {getattr(self.s, key)}",
                                 f"pass --{key.replace('_', '-')} {saved[key]}")
        load_params(self.optimizer_params(), _checkpoint_file(ckpt, "optimizer"))
        self.step, self.adam_step = state["step"], state["adam_step"]
        self.micro_position = state["micro_position"]
        self.scaler.scale, self.scaler.good_steps = state["loss_scale"], state["good_steps"]

    # ------------------------------------------------------------------------------------------------- loop
    def train(self, callbacks: list[StepCallback] | None = None) -> TrainResult:
        from tqdm import tqdm

        s = self.s
        s.output_dir.mkdir(parents=True, exist_ok=True)
        for stale in s.output_dir.glob(f".{CKPT_PREFIX}*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)  # a save killed half-way
        if s.resume:
            if self.resume_from:
                self.restore()
                if self.rank == 0:
                    print(f"resuming from {self.resume_from} (step {self.step})", file=sys.stderr)
            elif self.rank == 0:
                print(f"--resume: no checkpoint in {s.output_dir}; starting from step 0", file=sys.stderr)
        metrics_file = s.output_dir / "metrics.jsonl"
        last = _truncate_metrics(metrics_file, self.step) if self.rank == 0 else {}
        batches = self.reader.batches(self.micro_position % self.reader.micro_batches_per_epoch)
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                   disable=not self.progress or self.rank != 0 or None)
        # resumed: until a step runs, the result reports the last one recorded
        last_loss, tokens_per_s, saved = last.get("loss", float("nan")), last.get("tokens_per_s", 0.0), None
        step_tokens = self.reader.global_batch * (self.reader.width - 1) * s.grad_accum
        first, stop = self.step, False
        # data parallel: an interrupt, or the launcher's exit, stops every rank after the same step (a rank leaving
        # alone would block the others in their next all-reduce); one process stops after the step it is in, so the
        # checkpoint never holds a half-counted step (weights updated, step or metrics row not yet)
        agreed = self.world > 1
        try:
            with (interrupts_deferred("this step (every rank stops after the same one)") if agreed
                  else nullcontext([])) as pending:
                while self.step < self.total_steps and not stop:
                    with (nullcontext() if agreed else
                          interrupts_deferred("the first step compiles" if self.step == first else "this step")):
                        t0 = time.perf_counter()
                        row, stop = self._step(batches, agreed and (bool(pending) or os.getppid() != self.launcher))
                        dt = time.perf_counter() - t0
                        tokens_per_s = step_tokens / dt
                        row |= {"tokens_per_s": round(tokens_per_s, 1), "step_s": round(dt, 4)}
                        last_loss = row["loss"]
                        if self.rank == 0:
                            with metrics_file.open("a", encoding="utf-8") as f:
                                f.write(json.dumps(row) + "\n")
                        bar.update(1)
                        bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{tokens_per_s:.0f}")
                        if s.save_steps and self.step % s.save_steps == 0 and self.step < self.total_steps:
                            saved = self.save()
                        for cb in callbacks or []:
                            cb(row)
            if stop:  # another rank's interrupt, or the launcher gone (this rank's own was raised above)
                from registry_spec.cli import Terminated

                why = "the launcher exited" if os.getppid() != self.launcher else "another rank was interrupted"
                print(f"\nrank {self.rank}: {why}: stopping after step {self.step} with the other ranks",
                      file=sys.stderr)
                raise Terminated()
        except KeyboardInterrupt:
            bar.close()
            if self.step > 0:
                if not self._is_saved(saved):  # (the step's periodic save may have run already)
                    saved = self.save(together=stop)  # every rank here after an agreed stop; else this one alone
                print(f"\ninterrupted: saved {saved}; continue with --resume", file=sys.stderr)
            raise
        bar.close()
        if not self._is_saved(saved):
            # an interrupt here would lose the finished run's checkpoint (and under data parallel, a waiting rank
            # leaving makes msrun kill rank 0's write)
            with interrupts_deferred("the final checkpoint is written"):
                saved = self.save()
        return TrainResult(output_dir=s.output_dir, steps=self.step, final_loss=last_loss,
                           checkpoint=saved / "model.safetensors", metrics_file=metrics_file,
                           tokens_per_s=round(tokens_per_s, 1))

    def _is_saved(self, saved: Path | None) -> bool:
        return saved is not None and saved.name == f"{CKPT_PREFIX}{self.step}"

    def _step(self, batches: Iterator[tuple[np.ndarray, np.ndarray]], stop: bool) -> tuple[dict, bool]:
        """One optimizer step over `grad_accum` micro-batches: its metrics row, and whether any rank asked to stop
        (`stop` here; agreed in the loss's all-reduce, so every rank answers the same)."""
        from mindspore import Tensor as T  # noqa: N812 - short: every host value becomes one

        from .optim import cosine_with_warmup

        s = self.s
        scale = T(np.float32(self.scaler.scale))
        losses = []
        for _ in range(s.grad_accum):
            ids, labels = next(batches)
            losses.append(self.accumulate(T(ids), T(labels), scale))
            self.micro_position += 1
        loss = sum(float(x.asnumpy()) for x in losses) / len(losses)
        if self.sync is not None:
            loss, stop = self.sync.mean(loss, stop)
        sq = float(self.stats().asnumpy())
        unscale = 1.0 / (self.scaler.scale * s.grad_accum)
        grad_norm = math.sqrt(sq) * unscale if math.isfinite(sq) else float("inf")
        finite = math.isfinite(grad_norm)
        lr = cosine_with_warmup(self.step, s.learning_rate, s.lr_end, s.warmup_steps, self.total_steps)
        if finite:
            self.adam_step += 1
            clip = min(1.0, s.grad_clip / (grad_norm + 1e-6)) if s.grad_clip > 0 else 1.0
            bc1 = 1.0 - s.beta1 ** self.adam_step if s.bias_correction else 1.0
            bc2 = 1.0 - s.beta2 ** self.adam_step if s.bias_correction else 1.0
            self.adamw(T(np.float32(lr)), T(np.float32(unscale * clip)), T(np.float32(bc1)), T(np.float32(bc2)))
        else:
            self.clear()
        row = {"step": self.step + 1, "loss": loss, "lr": lr, "grad_norm": grad_norm, "loss_scale": self.scaler.scale,
               "skipped": not finite, "epoch": self.micro_position // self.reader.micro_batches_per_epoch}
        self.scaler.update(finite)
        self.step += 1
        return row, stop


def _truncate_metrics(path: Path, step: int) -> dict:
    """Drop metric rows past `step` (a resumed run re-logs them); the last row kept ({} if none)."""
    if not path.is_file():
        return {}
    keep = [row for row in map(json.loads, filter(str.strip, path.read_text(encoding="utf-8").splitlines()))
            if row.get("step", 0) <= step]
    write_jsonl(path, keep)
    return keep[-1] if keep else {}

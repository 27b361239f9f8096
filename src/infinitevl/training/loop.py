"""The training loop shared by every stage.

A stage supplies an *objective*: an nn.Module that holds the student as `.student` (the only
registered submodule, so DDP/FSDP2 see exactly the trained model; a teacher is kept outside the
parameter tree), and whose forward maps a PackedBatch to (summed loss, extra sums). `units(batch)`
says what the sum runs over (target tokens, positions, token x channel). The loop divides by the
units of the whole step (all micro-batches, all ranks), so packing, accumulation and the number of
processes do not change the loss.

Per step: accumulate over `grad_accum` rows (`rows_per_forward` of them concatenated per forward) under bf16
autocast, clip, AdamW, warmup + cosine.
Checkpoints (see checkpointing.py) restore model, optimizer, scheduler, data position and RNG, so
a resumed run continues with bitwise the same losses.
"""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..layers.fuse import share_frozen_storage, unshare_storage
from ..model.fingerprint import weights_fingerprint
from . import checkpointing
from .distributed import Dist, all_sum, gather_objects, no_sync, wrap
from .loader import RowLoader
from .options import OptimConfig, RunConfig
from .packing import PackedBatch
from .params import count


# setup keys that fingerprint weights: those a run starts from (frozen: the student's and the teacher's; start: the
# student's trained weights before step 1)
WEIGHT_KEYS = ("frozen", "start")
# setup keys that name directories: a run whose model moved resumes when the weights are the same
PATH_KEYS = ("model", "teacher", "student")


class Objective(nn.Module):
    """Base for stage objectives: `student` is registered; subclasses implement forward and units."""

    student: nn.Module

    def units(self, batch: PackedBatch) -> int:
        raise NotImplementedError

    def shard_units(self) -> list[nn.Module]:
        return list(self.student.model.layers)


def lr_lambda(total: int, warmup: int, kind: str, min_ratio: float):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1 - progress
        return min_ratio + (1 - min_ratio) * max(0.0, decay)
    return f


def store_frozen_in_bf16(module: nn.Module) -> list[tuple[nn.Parameter, torch.dtype]]:
    """Frozen weights whose values are exact in bfloat16 (a released bf16 checkpoint loaded in float32) are
    stored in bfloat16, in place: nothing changes but memory and autocast's per-forward casts, and an
    exported checkpoint keeps them bit for bit. Trained weights keep their dtype, and so do embedding tables
    (their dtype is the residual stream's: float32 under autocast). Returns the converted parameters with
    their former dtypes (`restore_dtypes` undoes it, losslessly)."""
    converted = []
    embeddings = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
    with torch.no_grad():
        for p in module.parameters():
            if (not p.requires_grad and p.is_floating_point() and p.dtype != torch.bfloat16
                    and id(p) not in embeddings):
                b = p.data.to(torch.bfloat16)
                if torch.equal(b.to(p.dtype), p.data):
                    converted.append((p, p.dtype))
                    p.data = b
    return converted


def restore_dtypes(converted: list[tuple[nn.Parameter, torch.dtype]]) -> None:
    with torch.no_grad():
        for p, dtype in converted:
            p.data = p.data.to(dtype)


def make_optimizer(module: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and cfg.weight_decay else no_decay).append(p)
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    if not groups:
        raise ValueError("nothing to train: every parameter is frozen (check `trainable`)")
    # CUDA: the fused kernel (one launch for all tensors; the per-tensor loop cost ~50 ms a step at 1B trained
    # parameters on an H100); elsewhere the plain loop
    cuda = groups[0]["params"][0].device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             **({"fused": True} if cuda else {"foreach": False}))


@dataclass
class TrainResult:
    history: list[dict[str, Any]] = field(default_factory=list)
    final_step: int = 0
    total_steps: int = 0
    checkpoint: Path | None = None
    stopped_early: bool = False


class Trainer:
    def __init__(self, objective: Objective, loader: RowLoader, *, run: RunConfig, optim: OptimConfig, d: Dist,
                 model_config, init_dir: Path | None, setup: dict | None = None):
        """setup: what the run starts from that its checkpoints do not hold (the stage, the model and teacher
        directories, objective and LoRA settings: plain values), recorded in every checkpoint; a resume with
        other values is refused. The frozen weights' fingerprint is added here."""
        self.run, self.optim_cfg, self.d = run, optim, d
        self.loader, self.model_config, self.init_dir = loader, model_config, init_dir
        self.out = Path(run.output_dir)
        self.setup = dict(setup or {})
        objective.student.model.gradient_checkpointing = run.gradient_checkpointing
        objective.student.model.recompute_layers = run.recompute_layers
        objective.to(d.device).train()
        # what no checkpoint holds: the student's frozen weights and the teacher (kept outside the objective's
        # parameters); every process must start from the same ones
        teacher = getattr(objective, "teacher", None)
        self.setup["frozen"] = weights_fingerprint(
            [(n, p) for n, p in objective.student.named_parameters() if not p.requires_grad]
            + ([(f"teacher.{n}", p) for n, p in teacher.named_parameters()] if teacher is not None else []))
        # and the trained weights it starts from: a resume from another start (e.g. a model directory replaced
        # by another fine-tune with the same frozen weights) is refused
        self.setup["start"] = weights_fingerprint(  # LoRA adapters are new (seeded), not part of the start
            [(n, p) for n, p in objective.student.named_parameters() if p.requires_grad and "lora_" not in n])
        prints = gather_objects(self.setup["frozen"], d)
        if len(set(prints)) > 1:
            raise ValueError(f"the processes loaded different weights (frozen-weight fingerprints {prints}): give "
                             "every process the same model and teacher files")
        self.backend = objective.student.set_backend(run.backend)  # fla's training kernels on a GPU
        strategy = run.parallel
        if strategy == "auto":
            strategy = "fsdp" if d.device.type == "cuda" else "ddp"
        # restored after the run (`release`), so the caller's model is float32 again for use without autocast
        self.in_bf16 = store_frozen_in_bf16(objective) if run.bf16 and run.frozen_bf16 else []
        self.restore_after = strategy != "fsdp" or not d.enabled
        # frozen sibling projections in one storage: the fast backend's per-forward concatenation of them becomes
        # a view (FSDP2 over several processes shards each parameter into its own storage, so not there)
        self.shared = share_frozen_storage(objective) if self.restore_after else []
        self.objective = objective
        try:
            self.wrapped = wrap(objective, d, strategy, objective.shard_units())
            self.optimizer = make_optimizer(self.wrapped, optim)
            self.total = loader.total_steps(run.epochs)
            if run.max_steps is not None:
                self.total = min(self.total, run.max_steps)
            if self.total < 1:
                rows = loader.rows_in_epoch(0)
                raise ValueError(f"the run has no optimizer step: an epoch packs {rows} row(s) and a step takes "
                                 f"{loader.world * loader.accum} (grad_accum x processes): add data, lower "
                                 "grad_accum or data.row_tokens, or raise epochs")
        except BaseException:
            self.release()
            raise
        warmup = math.ceil(optim.warmup_ratio * self.total)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(self.total, warmup, optim.scheduler, optim.min_lr_ratio))
        self.step = 0
        self.trainable, self.n_params = count(objective.student)
        self.trained_names = sorted(n for n, p in objective.student.named_parameters() if p.requires_grad)

    # ---- state ----
    def _trainer_state(self) -> dict[str, Any]:
        return {"step": self.step, "loader": self.loader.state_dict(), "total": self.total,
                "skipped": dict(self.loader.dataset.skipped), "trained": self.trained_names,
                "optim": dataclasses.asdict(self.optim_cfg), "setup": self.setup}

    def _same_run(self, ck: Path, st: dict[str, Any]) -> None:
        """Refuses a checkpoint of a run with other settings (its optimizer state and schedule would not fit)."""
        fix = "resume with the same settings, or use a new output_dir"
        if st["total"] != self.total:
            raise ValueError(f"{ck} belongs to a run of {st['total']} steps but this config gives {self.total}: "
                             f"{fix} (the data and run settings decide the step count)")
        if "trained" in st and st["trained"] != self.trained_names:
            added = sorted(set(self.trained_names) - set(st["trained"]))
            gone = sorted(set(st["trained"]) - set(self.trained_names))
            raise ValueError(f"{ck} trained another parameter set ({len(added)} parameters added, e.g. {added[:2]}; "
                             f"{len(gone)} removed, e.g. {gone[:2]}): {fix}")
        self._same_setup(ck, st.get("setup"), fix)
        changed = {k: (v, getattr(self.optim_cfg, k)) for k, v in st.get("optim", {}).items()
                   if getattr(self.optim_cfg, k, v) != v}
        if changed:
            keys = ", ".join(f"optim.{k} {old!r} -> {new!r}" for k, (old, new) in changed.items())
            raise ValueError(f"{ck} was trained with other optimizer settings ({keys}); the optimizer and schedule "
                             f"continue from the checkpoint: {fix}")

    def _same_setup(self, ck: Path, old: dict | None, fix: str) -> None:
        """The checkpoint's run started from the same stage, model, teacher and settings. A model directory that
        moved is the same model when the frozen weights' fingerprint is unchanged."""
        if old is None:  # written before setups were recorded
            return
        new = self.setup
        # keys both runs know (a later version may record more; a key one of them lacks is not compared)
        changed = {k: (old[k], new[k]) for k in sorted(set(old) & set(new))
                   if k not in WEIGHT_KEYS and _differs(old[k], new[k])}
        same_weights = all(old[k] == new[k] for k in WEIGHT_KEYS if k in old and k in new)
        if changed and (set(changed) - set(PATH_KEYS) or not same_weights):
            keys = "; ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
            raise ValueError(f"{ck} belongs to another run ({keys}): {fix}")
        if not same_weights:
            raise ValueError(f"{ck}: the weights of the model (or the teacher) this run starts from changed since "
                             f"the run began (the directories are the same, their contents are not): {fix}")

    def save(self) -> Path | None:
        return checkpointing.save(
            self.out, self.step, wrapped=self.wrapped, prefix="student.", model_config=self.model_config,
            optimizer=self.optimizer, scheduler=self.scheduler, trainer=self._trainer_state(), d=self.d,
            init_dir=self.init_dir, keep_last=self.run.keep_last)

    def maybe_resume(self) -> bool:
        if not self.run.resume:
            old = checkpointing.existing(self.out)
            if old:
                raise ValueError(f"run.output_dir {self.out} holds checkpoints of an earlier run ({', '.join(old)}) "
                                 "and run.resume is false: resume that run (run.resume: true), or start over in a "
                                 "new run.output_dir (or delete the folder)")
            return False
        ck = checkpointing.latest(self.out)
        if ck is None:
            return False
        st = checkpointing.load(ck, wrapped=self.wrapped, prefix="student.",
                                tied=self.model_config.text.tie_word_embeddings, optimizer=self.optimizer,
                                scheduler=self.scheduler, d=self.d, check=lambda st: self._same_run(ck, st))
        for g in self.optimizer.param_groups:  # the implementation is this run's choice, not the checkpoint's
            for key in ("fused", "foreach"):
                g[key] = self.optimizer.defaults.get(key)
        self.step = st["step"]
        self.loader.load_state_dict(st["loader"])
        self.loader.dataset.skipped.update(st.get("skipped", {}))
        if self.d.main:
            _truncate_log(self.out / "metrics.jsonl", self.step)
        return True

    # ---- one step ----
    def _train_step(self) -> dict[str, Any]:
        rows = self.loader.next_step()
        n = self.run.rows_per_forward  # concatenated on the host: no second device copy of the pixels
        batches = [PackedBatch.concat(rows[i:i + n]).to(self.d.device) for i in range(0, len(rows), n)]
        if all_sum(0 if batches else 1, self.d):
            raise ValueError(f"step {self.step + 1}: every sample of a row failed to load on some rank "
                             f"({dict(self.loader.dataset.skipped)} skipped so far): fix or drop the bad records")
        units = all_sum(sum(self.objective.units(b) for b in batches), self.d)
        if units == 0:
            raise ValueError(f"step {self.step + 1} has nothing to learn from on any rank (no target tokens): "
                             f"check the data (every sample needs an assistant answer)")
        scale = self.d.world / units  # DDP/FSDP average gradients over ranks; undo that, divide by global units
        # the logged values stay on the device until the step's work is queued: reading one waits for the GPU to
        # finish, which then idles while the host queues the next kernels (gradient clipping, the optimizer)
        losses, extras_t = [], {}
        dev = self.d.device.type
        for k, b in enumerate(batches):
            with no_sync(self.wrapped, last=k == len(batches) - 1):
                with torch.autocast(dev, dtype=torch.bfloat16, enabled=self.run.bf16):
                    loss, extra = self.wrapped(b)
                (loss * scale).backward()
            losses.append(loss.detach())
            for key, v in extra.items():
                extras_t.setdefault(key, []).append(v.detach() if torch.is_tensor(v) else v)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        # the norm is taken (and logged) also without clipping: a step whose gradients are not finite stops the run
        gn = torch.nn.utils.clip_grad_norm_(params, self.optim_cfg.max_grad_norm or float("inf"))
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        grad_norm = float(gn.full_tensor() if hasattr(gn, "full_tensor") else gn)
        loss_sum = sum(float(x) for x in losses)
        extras = {key: sum(float(x) for x in vs) for key, vs in extras_t.items()}
        tokens = all_sum(sum(b.num_tokens for b in batches), self.d)
        rec = {"step": self.step, "epoch": self.loader.state.epoch, "loss": all_sum(loss_sum, self.d) / units,
               "lr": lr, "grad_norm": grad_norm, "tokens": int(tokens), "units": int(units)}
        for key, v in extras.items():
            rec[key] = all_sum(v, self.d) / units
        return rec

    def _check_finite(self, rec: dict[str, Any]) -> None:
        """Stops a run whose loss or gradient norm stopped being finite, before its weights are saved."""
        if math.isfinite(rec["loss"]) and math.isfinite(rec["grad_norm"]):
            return
        last = checkpointing.latest(self.out)
        kept = f"the last checkpoint {last} is intact" if last else "no checkpoint was written"
        raise ValueError(f"step {rec['step']}: the loss is {rec['loss']} and the gradient norm {rec['grad_norm']}: "
                         "training diverged (lower optim.lr, clip with optim.max_grad_norm > 0, or check the data). "
                         f"Nothing of this step was saved; {kept}")

    def release(self) -> None:
        """Gives the caller's model back in its own dtypes and storages (undoes store_frozen_in_bf16 and
        share_frozen_storage; not under FSDP2 over several processes, whose sharded parameters stay as trained).
        Runs after fit(), also when it raises, and when construction fails."""
        if self.restore_after:
            restore_dtypes(self.in_bf16)
            unshare_storage(self.shared)
        self.in_bf16, self.shared = [], []

    def fit(self) -> TrainResult:
        try:
            return self._fit()
        finally:
            self.release()

    def _fit(self) -> TrainResult:
        resumed = self.maybe_resume()
        res = TrainResult(total_steps=self.total)
        log = self.out / "metrics.jsonl"
        if self.d.main:
            self.out.mkdir(parents=True, exist_ok=True)
            print(f"[train] {self.n_params / 1e6:.2f}M params, {self.trainable / 1e6:.3f}M trainable, "
                  f"{self.total} steps, {self.d.world} process(es) on {self.d.device}"
                  + (f", resumed at step {self.step}" if resumed else ""), flush=True)
            rows = self.loader.rows_in_epoch(self.loader.state.epoch)
            per_step = self.loader.world * self.loader.accum
            if rows % per_step:
                print(f"[train] this epoch packs {rows} rows; a step takes {per_step} (grad_accum x processes), so "
                      f"its last {rows % per_step} rows are not used (each epoch shuffles again)", flush=True)
        if resumed and self.step == self.total and self.d.main:
            print(f"[train] {self.out} holds a finished run ({self.total} steps): nothing to train; final/ is "
                  "written again from its last checkpoint. To train again, give a new run.output_dir.", flush=True)
        bar = None
        if self.run.progress and self.d.main:
            from tqdm.auto import tqdm
            bar = tqdm(total=self.total, initial=self.step, desc="train", dynamic_ncols=True)
        done_here = 0
        t0 = time.time()
        while self.step < self.total:
            rec = self._train_step()
            self._check_finite(rec)
            done_here += 1
            rec["skipped"] = sum(self.loader.dataset.skipped.values())
            rec["elapsed_s"] = round(time.time() - t0, 3)
            res.history.append(rec)
            if self.d.main:
                if self.step % self.run.log_every == 0 or self.step == self.total:
                    with open(log, "a") as f:
                        f.write(json.dumps(rec) + "\n")
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{rec['loss']:.4g}", lr=f"{rec['lr']:.2e}")
            last = self.step == self.total
            stop = self.run.stop_after is not None and done_here >= self.run.stop_after and not last
            if last or stop or self.step % self.run.save_every == 0:
                res.checkpoint = self.save()
            if stop:
                res.stopped_early = True
                break
        if bar is not None:
            bar.close()
        res.final_step = self.step
        if self.step == self.total and self.d.main:
            ck = checkpointing.latest(self.out)
            final = self.out / "final"
            tmp = self.out / "final.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(ck, tmp, ignore=shutil.ignore_patterns(checkpointing.STATE_FILE))
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
        skipped = self.loader.dataset.skipped
        if skipped and self.d.main:  # also when the run stops early: what was skipped so far
            print(f"[train] skipped bad samples: {skipped} (see {self.out / 'skipped.txt'})", flush=True)
            (self.out / "skipped.txt").write_text("\n".join(self.loader.dataset.skip_log) + "\n")
        return res


def _differs(a: Any, b: Any) -> bool:
    """Setup values differ (in mappings, only the keys both hold count)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return any(_differs(a[k], b[k]) for k in a.keys() & b.keys())
    return a != b


def _truncate_log(path: Path, step: int) -> None:
    """Drops log lines past `step` (written by the interrupted run after its last checkpoint)."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    path.write_text("".join(ln + "\n" for ln in keep))

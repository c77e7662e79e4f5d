"""Two-phase transfer learning, fast on a CPU: frozen base + new head, then fine-tuning of the upper base.

How it stays fast without changing what is learned: the lower base (``features[:unfreeze_from]``) is
frozen in *both* phases, so its output for a given input never changes. crackscan runs it once per
image and augmented view, keeps the activations, and trains everything above on that cache:

* phase 1 ("head"): the upper base is frozen too, so each view is reduced once more to its 1280-d
  pooled feature and the head trains on vectors in seconds;
* phase 2 ("finetune"): the upper base and the head train at a lower learning rate on the cached
  lower activations, which costs about a tenth of a full forward/backward pass.

Every epoch ends with an atomic checkpoint (weights, optimizer, scheduler, history) so a run can be
resumed after Ctrl-C or a crash with ``crackscan train --resume RUN_DIR``.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import math
import os
import shutil
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from crackscan.data import (
    DataError,
    Dataset,
    apply_split,
    assign_groups,
    find_classes,
    group_by_file,
    load_dataset,
    read_split,
    split_changes,
    split_groups,
    write_problems,
    write_split,
)
from crackscan.model import (
    DEFAULT_UNFREEZE_FROM,
    INPUT_SIZES,
    META_KEY,
    CrackModel,
    ModelError,
    atomic_save_tensors,
    build_model,
    describe_weights,
    load_pretrained_base,
    make_meta,
    save_model,
    split_base,
    weights_keyword,
)
from crackscan.runtime import cpu_count, parallel_map
from crackscan.transforms import IMAGENET_MEAN, IMAGENET_STD, Augment, TrainPreset, man_made_negative, normalize_batch

CHECKPOINT = "checkpoint.safetensors"
MODEL = "model.safetensors"
PHASES = ("head", "finetune")
#: View 0's features are computed in this many parts over the first head epochs (see Trainer.images_at).
#: Six: a sixth of the training images, cycled through, already gave the head 99.7-99.8% validation accuracy.
FIRST_PARTS = 6


@dataclass
class TrainConfig:
    """Everything a training run depends on; saved in the run folder and the model file."""

    data: str
    out: str = "runs"
    name: str | None = None
    weights: str | None = "imagenet"
    input_size: int = 96  # benchmarks/input_size.py: test accuracy holds down to 80; 96 keeps the scan maps sharper
    batch_size: int = 64
    head_epochs: int = 10
    finetune_epochs: int = 4
    head_lr: float = 3e-3
    finetune_lr: float = 2e-4
    weight_decay: float = 1e-4
    dropout: float = 0.2
    unfreeze_from: int = DEFAULT_UNFREEZE_FROM
    batchnorm: str = "frozen"  # "frozen": fine-tuned blocks keep ImageNet BN statistics; "train": update them
    views: int = 2  # augmented views cached per training image
    # Extra negatives with drawn cables/edges/joints, as a fraction of the negatives. 0.3 kept test accuracy
    # (99.82% vs 99.79% at 112 px) and cut the cable wall photo's flagged area from 7.8% to 2.4%; 0.5 (with
    # ragged edges, 96 px) did worse on both counts (99.75%, 0.9%) than 0.3 (99.82%, 0.3%).
    hard_negatives: float = 0.3
    patience: int = 2  # epochs without a better validation loss before a phase stops early
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 0
    augment: Augment = field(default_factory=Augment)
    crack_class: str | None = None
    manifest: str | None = None
    run_length: int = 500
    target_recall: float | None = None
    # Mosaics of training patches the whole-photo scan's dense head is fitted on (crackscan.dense_head);
    # 0: no dense head, scan averages the classifier's head over each patch's cells.
    dense_mosaics: int = 60
    # Photo-sized mosaics of validation patches the scan's verdict threshold is chosen on (crackscan.calibrate),
    # at most two per validation crack patch; 0: scans judge their maps at the patch threshold.
    scan_mosaics: int = 200
    quiet: bool = False

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["augment"] = self.augment.to_dict()
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        d = dict(d)
        d["augment"] = Augment(**d.get("augment", {}))
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class TrainResult:
    run_dir: Path
    model_path: Path
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    interrupted: bool = False
    skipped: list[str] = field(default_factory=list)  # "file: reason" for each file not used


class TrainingInterrupted(Exception):
    """Ctrl-C during training; the last finished epoch is saved and the run can be resumed."""

    def __init__(self, run_dir: Path, epoch: int, after_training: bool = False):
        if after_training:
            message = (f"interrupted after training, while fitting the dense head; epochs 1-{epoch} are saved in "
                       f"{run_dir}. Finish with: crackscan train --resume {run_dir}")
        elif epoch == 0:
            message = f"interrupted during epoch 1, before any epoch was saved in {run_dir}; start the run again"
        else:
            message = (
                f"interrupted during epoch {epoch + 1}; epochs 1-{epoch} are saved in {run_dir}. "
                f"Continue with: crackscan train --resume {run_dir}"
            )
        super().__init__(message)
        self.run_dir = run_dir


def new_run_dir(out: str | Path, name: str | None) -> Path:
    """``out/name`` or ``out/train-YYYYmmdd-HHMMSS``, made unique with a numeric suffix."""
    base = Path(out) / (name or datetime.now().strftime("train-%Y%m%d-%H%M%S"))
    path, n = base, 2
    while path.exists():
        path, n = base.with_name(f"{base.name}-{n}"), n + 1
    path.mkdir(parents=True)
    return path


# ----------------------------------------------------------------------------------------------------
# The activation cache


class _BaseOutputs(nn.Module):
    """The frozen base as training needs it: lower activations (for fine-tuning) and pooled features (for the head)."""

    def __init__(self, lower: nn.Module, upper_base: nn.Module):
        super().__init__()
        self.lower, self.upper_base = lower, upper_base

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        activations = self.lower(x)
        return activations, self.upper_base(activations)


@torch.inference_mode()
def run_base(base: _BaseOutputs, pixels: np.ndarray, batch_size: int, desc: str, quiet: bool,
             runner: Callable[[np.ndarray], list[np.ndarray]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen base over NxSxSx3 uint8 pixels -> (float16 lower activations, float32 pooled features).

    ``runner`` (from :func:`crackscan.export.frozen_runner`) computes the same with ONNX Runtime.
    """
    activations, pooled = [], []
    for start in tqdm(range(0, len(pixels), batch_size), desc=desc, unit="batch", disable=quiet, leave=False):
        batch = pixels[start : start + batch_size]
        if runner is not None:
            lower, features = (torch.from_numpy(a) for a in runner(batch))
        else:
            lower, features = base(normalize_batch(batch, IMAGENET_MEAN, IMAGENET_STD))
        activations.append(lower.to(torch.float16))
        pooled.append(features.float())
    return torch.cat(activations), torch.cat(pooled)


def base_runner(base: _BaseOutputs, size: int) -> Callable[[np.ndarray], list[np.ndarray]] | None:
    """ONNX Runtime for the frozen base when it is installed and exports; None means eager PyTorch."""
    try:
        from crackscan.export import frozen_runner

        return frozen_runner(base.eval(), size, IMAGENET_MEAN, IMAGENET_STD)
    except ImportError:
        return None
    except Exception as err:  # an export problem costs speed, never the run
        warnings.warn(f"ONNX Runtime not used for the frozen base ({type(err).__name__}: {err}); using PyTorch")
        return None


def _draw_negative(item: tuple[np.ndarray, int], seed: int) -> np.ndarray:
    pixels, index = item
    return man_made_negative(pixels, np.random.default_rng([seed, 17, index]))


def augmented_view(pixels: np.ndarray, preset: TrainPreset, view: int, seed: int) -> np.ndarray:
    """One augmented copy of every image; image i of view v is reproducible from (seed, v, i)."""

    def one(i: int) -> None:
        g = torch.Generator().manual_seed(seed * 1_000_003 + view * 100_003 + i)
        out[i] = preset(torch.from_numpy(pixels[i]).permute(2, 0, 1), g).permute(1, 2, 0).numpy()

    out = np.empty_like(pixels)
    threads = torch.get_num_threads()
    # Per-image ops are tiny: intra-op threads only add hand-off cost (10-100x slower on a busy
    # machine), so each worker thread runs single-threaded torch and the images go in parallel.
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=cpu_count()) as pool:
            list(pool.map(one, range(len(pixels))))
    finally:
        torch.set_num_threads(threads)
    return out


# ----------------------------------------------------------------------------------------------------
# Checkpoints


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors, plain = {}, {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optim.{pid}.{key}"] = value
            else:
                plain[f"{pid}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "plain": plain}


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    for name, value in info["plain"].items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    opt.load_state_dict({"state": state, "param_groups": info["param_groups"]})


def save_checkpoint(path: Path, model: nn.Module, opt, sched, progress: dict[str, Any]) -> None:
    """Weights, optimizer and scheduler state and progress, written atomically."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors[RNG_KEY] = torch.get_rng_state()  # dropout's draws: a resumed run goes on as the run would have
    opt_tensors, opt_info = _optimizer_tensors(opt)
    tensors.update(opt_tensors)
    doc = dict(progress, optimizer=opt_info, scheduler=sched.state_dict())
    atomic_save_tensors(path, tensors, {META_KEY: json.dumps(doc)})


#: The checkpoint's copy of PyTorch's global random state, which dropout draws from.
RNG_KEY = "rng.torch"

#: What a checkpoint's progress record holds, besides the optimizer's and scheduler's state.
_CHECKPOINT_FIELDS = ("history", "best_val_loss", "best_epoch", "phase", "epoch", "phase_epoch", "phase_done",
                      "bad_epochs", "optimizer", "scheduler")


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A checkpoint's tensors and progress record.

    Raises:
        ModelError: The file is damaged or not a crackscan checkpoint.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            doc = json.loads((handle.metadata() or {})[META_KEY])
        tensors = load_file(str(path))
        missing = [name for name in _CHECKPOINT_FIELDS if name not in doc]
        if missing or not any(k.startswith("model.") for k in tensors):
            raise ValueError(f"no {', '.join(missing) or 'model weights'}")
    except (SafetensorError, OSError, KeyError, ValueError, TypeError) as err:
        raise ModelError(f"{path}: not a readable training checkpoint ({type(err).__name__}: {err}); "
                         "this run cannot be resumed, start a new one") from None
    return tensors, doc


# ----------------------------------------------------------------------------------------------------
# The loop


def _set_trainable(model: nn.Module, unfreeze_from: int, phase: str, batchnorm: str) -> list[nn.Parameter]:
    """Freeze/unfreeze for a phase and put modules in the right mode; returns the trainable parameters."""
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    trainable: list[nn.Module] = [model.classifier]
    if phase == "finetune":
        trainable.append(model.features[unfreeze_from:])
    for module in trainable:
        module.train()
        for p in module.parameters():
            p.requires_grad_(True)
        if batchnorm == "frozen":
            # Small crack batches give noisy BN statistics; keeping ImageNet's measured better here.
            for m in module.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
    return [p for p in model.parameters() if p.requires_grad]


def _make_optimizer(params, lr: float, weight_decay: float, steps: int):
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps), eta_min=lr * 0.01)
    return opt, sched


class Trainer:
    """Runs the two phases over the cached activations. It sees the network only as callables."""

    def __init__(self, config: TrainConfig, run_dir: Path, model: nn.Module, dataset: Dataset, writer=None,
                 started: float | None = None):
        self.config = config
        self.started = time.perf_counter() if started is None else started
        self.run_dir = run_dir
        self.model = model
        self.dataset = dataset
        self.writer = writer
        self.lower, self.upper = split_base(model, config.unfreeze_from)
        self.history: list[dict[str, Any]] = []
        self.pretrained = ""  # where the base's weights came from, kept in checkpoints for a resumed run's record
        self.elapsed_offset = 0.0
        self.n_hard_negatives = 0
        self.saved_epochs = 0  # epochs held by the checkpoint on disk
        self.best_val_loss = math.inf
        self.best_epoch = 0
        self.loss_fn = nn.CrossEntropyLoss()

    # -- caches -------------------------------------------------------------------------------
    def build_caches(self) -> None:
        """Validation activations and the first part of the first training view; the rest waits for the
        epoch that needs it.

        View 0 is the training images as decoded (the eval preset), so the first epoch starts without
        waiting for augmentation, and in a fixed random order, so that its first part is a fair sample:
        the head phase's first epochs train on the part that is ready (:meth:`images_at`), and the
        first validation accuracy is known after a fraction of the base's work. Views 1.. are augmented
        and join during the head phase (:meth:`views_at`), or when fine-tuning starts; fine-tuning draws
        from all of them.
        """
        c, ds = self.config, self.dataset
        t0 = time.perf_counter()
        train_idx, val_idx = ds.indices("train"), ds.indices("val")
        train_labels = ds.labels(train_idx)
        # Training item k is dataset image source[k], with a man-made line drawn on it when draw[k] >= 0
        # (draw[k] seeds the drawing). Pixels are gathered, and lines drawn, only for the part of the
        # training set that the base is about to run over: no copy of the whole set up front.
        source, draw = train_idx, np.full(len(train_idx), -1)
        if c.hard_negatives > 0:
            negative = 1 - ds.crack_index
            pool = np.flatnonzero(train_labels == negative)
            rng = np.random.default_rng(c.seed + 17)
            chosen = rng.choice(pool, size=min(len(pool), round(c.hard_negatives * len(pool))), replace=False)
            source, draw = np.concatenate([source, train_idx[chosen]]), np.concatenate([draw, chosen])
            train_labels = np.concatenate([train_labels, np.full(len(chosen), negative)])
            self.n_hard_negatives = len(chosen)
        order = np.random.default_rng([c.seed, 29]).permutation(len(train_labels))
        self.train_source, self.train_draw = source[order], draw[order]
        self.y_train = torch.from_numpy(train_labels[order])
        self.y_val = torch.from_numpy(ds.labels(val_idx))
        self.preset = TrainPreset(c.input_size, c.augment)
        self.n_views = max(1, c.views) if c.augment != Augment.none() else 1
        # Drawn hard negatives, kept while augmented views are still to be made from them.
        self._drawn: dict[int, np.ndarray] | None = {} if self.n_views > 1 else None
        shown = self.training_pixels(0, min(16, len(order)))
        self.sample_views = augmented_view(shown, self.preset, 1, c.seed) if self.n_views > 1 else shown
        upper_base = nn.Sequential(*list(self.upper.children())[:-1])  # everything but the head
        self.base = _BaseOutputs(self.lower, upper_base).eval()
        self.runner = base_runner(self.base, c.input_size)
        self.views: list[torch.Tensor] = []  # lower activations per view, for fine-tuning
        self.view_features: list[torch.Tensor] = []  # pooled features per view, for the head phase
        self._parts: list[tuple[torch.Tensor, torch.Tensor]] = []  # view 0 while it is computed part by part
        self.val_cache, self.val_features = run_base(self.base, ds.pixels[val_idx], 128, "base val", c.quiet, self.runner)
        self.ensure_views(1, self.images_at(0))
        self.cache_seconds = time.perf_counter() - t0

    def ensure_views(self, n: int, images: int | None = None) -> None:
        """Run the frozen base over training views up to ``n`` (each is reproducible).

        ``images`` limits view 0 to its first images while it is the last view asked for; a later
        call continues where it stopped.
        """
        c = self.config
        total = len(self.y_train)
        for v in range(len(self.views), min(n, self.n_views)):
            if v == 0:
                done = sum(len(a) for a, _ in self._parts)
                stop = total if images is None or n > 1 else max(done, min(total, images))
                if stop > done:
                    self._parts.append(run_base(self.base, self.training_pixels(done, stop), 128,
                                                f"base view 1/{self.n_views}", c.quiet, self.runner))
                if stop < total:
                    return
                activations = torch.cat([a for a, _ in self._parts])
                features = torch.cat([f for _, f in self._parts])
                self._parts = []
            else:
                # One view at a time: only its activations are kept, not the augmented pixels.
                pixels = augmented_view(self.training_pixels(0, total), self.preset, v, c.seed)
                activations, features = run_base(self.base, pixels, 128, f"base view {v + 1}/{self.n_views}",
                                                 c.quiet, self.runner)
                del pixels
            self.views.append(activations)
            self.view_features.append(features)
        if len(self.views) == self.n_views:
            self._drawn = self.runner = None  # every view is cached: drawn lines and session can go

    def head_inputs(self, n_views: int) -> torch.Tensor:
        """Pooled features of the first ``n_views`` views (V x N x 1280), or of view 0's ready part (1 x M x 1280)."""
        if self.views:
            return torch.stack(self.view_features[:n_views])
        return torch.cat([f for _, f in self._parts]).unsqueeze(0)

    def images_at(self, head_epoch: int) -> int:
        """Training images (of view 0) ready for the head phase's epoch ``head_epoch`` (0-based).

        View 0 is computed in :data:`FIRST_PARTS` parts (fewer when the phase has fewer epochs), one per
        epoch, so the first epoch waits for a fraction of the base's work; each epoch still takes as many
        steps as a full one, cycling through the part that is ready.
        """
        total, parts = len(self.y_train), max(1, min(FIRST_PARTS, self.config.head_epochs))
        return min(total, math.ceil(total * (head_epoch + 1) / parts))

    def views_at(self, head_epoch: int) -> int:
        """Views the head phase draws from in its epoch ``head_epoch`` (0-based): they join evenly spread
        over the phase, after view 0 is complete, so the first epochs need only view 0 and take a fraction
        of a second each. Views the head phase does not reach (it stopped early, or has fewer epochs than
        views) are cached when fine-tuning starts."""
        joined = 1 + head_epoch * self.n_views // max(1, self.config.head_epochs)
        return 1 if self.images_at(head_epoch) < len(self.y_train) else min(self.n_views, joined)

    def training_pixels(self, start: int, stop: int) -> np.ndarray:
        """Pixels of training items ``start:stop`` in the shuffled order, hard negatives drawn.

        A hard negative is drawn from its own generator (the same lines in any order and on any worker),
        once while augmented views are still to be made from it (kept in ``_drawn``), else at each call.
        """
        out = self.dataset.pixels[self.train_source[start:stop]]
        keys = self.train_draw[start:stop]
        hard = np.flatnonzero(keys >= 0)
        cache = self._drawn if self._drawn is not None else {}
        todo = [j for j in hard if int(keys[j]) not in cache]
        drawn = parallel_map(functools.partial(_draw_negative, seed=self.config.seed),
                             [(out[j], int(keys[j])) for j in todo])
        cache.update((int(keys[j]), px) for j, px in zip(todo, drawn))
        for j in hard:
            out[j] = cache[int(keys[j])]
        return out

    # -- one epoch ----------------------------------------------------------------------------
    def _epoch(self, phase: str, epoch: int, opt, sched, inputs) -> tuple[float, float]:
        c = self.config
        g = torch.Generator().manual_seed(c.seed * 7919 + epoch)
        n, ready = len(self.y_train), inputs.shape[1]
        # An epoch is n steps' worth of samples; while only part of view 0 is ready, it cycles through it.
        order = torch.cat([torch.randperm(ready, generator=g) for _ in range(math.ceil(n / ready))])[:n]
        view_of = torch.randint(0, inputs.shape[0], (n,), generator=g)
        forward = self.model.classifier if phase == "head" else self.upper
        total_loss, correct, seen = 0.0, 0, 0
        bs = c.batch_size
        bar = tqdm(range(0, n, bs), desc=f"epoch {epoch + 1} ({phase})", unit="batch", disable=c.quiet, leave=False)
        for start in bar:
            idx = order[start : start + bs]
            x = inputs[view_of[idx], idx].float()
            if x.ndim == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            y = self.y_train[idx]
            logits = forward(x)
            loss = self.loss_fn(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total_loss += loss.item() * len(idx)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(idx)
        return total_loss / seen, correct / seen

    @torch.inference_mode()
    def _validate(self, phase: str, val_inputs: torch.Tensor) -> tuple[float, float]:
        forward = self.model.classifier if phase == "head" else self.upper
        was = [m.training for m in self.model.modules()]
        self.model.eval()
        logits = torch.cat([forward(val_inputs[i : i + 256].float()) for i in range(0, len(val_inputs), 256)])
        for m, t in zip(self.model.modules(), was):
            m.train(t)
        loss = float(self.loss_fn(logits, self.y_val))
        return loss, float((logits.argmax(1) == self.y_val).float().mean())

    # -- the phases ---------------------------------------------------------------------------
    def fit(self, resume: tuple[dict, dict] | None = None) -> None:
        c = self.config
        start_phase, start_epoch, phase_epoch0 = 0, 0, 0
        if resume is not None:  # its weights are in the model already: train() loads them before the caches
            tensors, doc = resume
            if RNG_KEY in tensors:  # checkpoints written before it was kept resume with a fresh seed
                torch.set_rng_state(tensors[RNG_KEY])
            self.history = doc["history"]
            self.elapsed_offset = float(self.history[-1].get("elapsed", 0)) if self.history else 0.0
            self.best_val_loss, self.best_epoch = doc["best_val_loss"], doc["best_epoch"]
            start_phase, start_epoch = PHASES.index(doc["phase"]), doc["epoch"]
            phase_epoch0 = doc["phase_epoch"]
            self.saved_epochs = doc["epoch"]
            if doc["phase_done"]:
                start_phase, phase_epoch0 = start_phase + 1, 0
        epoch = start_epoch
        steps_per_epoch = math.ceil(len(self.y_train) / c.batch_size)
        for p in range(start_phase, len(PHASES)):
            phase = PHASES[p]
            n_epochs = c.head_epochs if phase == "head" else c.finetune_epochs
            if n_epochs <= 0:
                continue
            lr = c.head_lr if phase == "head" else c.finetune_lr
            if phase == "finetune":
                # Views the head phase did not reach (early stop, few head epochs) are cached now, while
                # every block is still in eval mode; the pooled features are not needed any more.
                self.ensure_views(self.n_views)
                self.view_features = []
            params = _set_trainable(self.model, c.unfreeze_from, phase, c.batchnorm)
            opt, sched = _make_optimizer(params, lr, c.weight_decay, n_epochs * steps_per_epoch)
            bad_epochs = 0
            if resume is not None and phase_epoch0 > 0:
                tensors, doc = resume
                _load_optimizer(opt, tensors, doc["optimizer"])
                sched.load_state_dict(doc["scheduler"])
                bad_epochs = doc["bad_epochs"]
            if phase == "head":
                val_in = self.val_features
            else:
                train_in, val_in = torch.stack(self.views), self.val_cache
                self.views = list(train_in.unbind(0))  # share the stacked memory instead of holding it twice
            for phase_epoch in range(phase_epoch0, n_epochs):
                t0 = time.perf_counter()
                if phase == "head" and (phase_epoch == phase_epoch0 or self.views_at(phase_epoch) > len(train_in)
                                        or self.images_at(phase_epoch) > train_in.shape[1]):
                    # Restacked only when a view or a part of view 0 joins, not every half-second epoch.
                    self.ensure_views(self.views_at(phase_epoch), self.images_at(phase_epoch))
                    train_in = self.head_inputs(self.views_at(phase_epoch))
                lr_now = opt.param_groups[0]["lr"]
                try:
                    train_loss, train_acc = self._epoch(phase, epoch, opt, sched, train_in)
                except KeyboardInterrupt:
                    raise TrainingInterrupted(self.run_dir, epoch) from None
                val_loss, val_acc = self._validate(phase, val_in)
                improved = val_loss < self.best_val_loss - 1e-6
                if improved:
                    self.best_val_loss, self.best_epoch = val_loss, epoch + 1
                    save_model(self.run_dir / "best.safetensors", self.model, {"epoch": epoch + 1})
                bad_epochs = 0 if improved else bad_epochs + 1
                done = bad_epochs >= c.patience or phase_epoch + 1 == n_epochs
                row = {
                    "epoch": epoch + 1,
                    "phase": phase,
                    "train_loss": round(train_loss, 6),
                    "train_acc": round(train_acc, 6),
                    "val_loss": round(val_loss, 6),
                    "val_acc": round(val_acc, 6),
                    "lr": lr_now,
                    "seconds": round(time.perf_counter() - t0, 3),
                    # wall time since the run (or its first part, when resumed) began: time-to-accuracy
                    "elapsed": round(self.elapsed_offset + time.perf_counter() - self.started, 3),
                }
                self.history.append(row)
                epoch += 1
                progress = {
                    "epoch": epoch,
                    "phase": phase,
                    "phase_epoch": phase_epoch + 1,
                    "phase_done": done,
                    "bad_epochs": bad_epochs,
                    "best_val_loss": self.best_val_loss,
                    "best_epoch": self.best_epoch,
                    "history": self.history,
                    "pretrained": self.pretrained,
                }
                # The checkpoint is the record; history.csv is rewritten from it and can never disagree.
                save_checkpoint(self.run_dir / CHECKPOINT, self.model, opt, sched, progress)
                self.saved_epochs = epoch
                write_history(self.run_dir / "history.csv", self.history)
                self._log(row, improved)
                if done:
                    break
            phase_epoch0 = 0
            resume = None

    def _log(self, row: dict[str, Any], improved: bool) -> None:
        if self.writer is not None:
            step = row["epoch"]
            for key in ("train_loss", "val_loss"):
                self.writer.add_scalar(f"loss/{key[:-5]}", row[key], step)
            for key in ("train_acc", "val_acc"):
                self.writer.add_scalar(f"accuracy/{key[:-4]}", row[key], step)
            self.writer.add_scalar("learning_rate", row["lr"], step)
            self.writer.add_scalar("phase", PHASES.index(row["phase"]) + 1, step)
        if not self.config.quiet:
            mark = " *" if improved else ""
            print(
                f"epoch {row['epoch']:>2} {row['phase']:<8} train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}"
                f" | val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f} | lr {row['lr']:.2e} | {row['seconds']:.1f}s{mark}",
                flush=True,
            )


def write_history(path: Path, history: list[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as handle:
        fields = ["epoch", "phase", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds", "elapsed"]
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(history)
    os.replace(tmp, path)


def read_history(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


# ----------------------------------------------------------------------------------------------------
# The run


#: A test ROC-AUC at or below this is called "hardly better than chance" (0.5).
CHANCE_AUC = 0.6


def chance_warning(metrics: dict[str, Any], weights: str | None = None) -> str | None:
    """What to tell a user whose model ranks its test rows' cracks hardly better than chance.

    Judged on ROC-AUC, which no threshold (e.g. one chosen for a target recall) can move; None when the test
    rows hold one class only, where there is nothing to rank.
    """
    auc = metrics.get("roc_auc")
    if auc is None or not np.isfinite(auc) or auc > CHANCE_AUC:
        return None
    advice = ("train from pretrained weights (--weights imagenet, or a local file), with more images, or for more "
              "epochs" if weights_keyword(weights) == "none" else "train with more images, or for more epochs")
    return (f"test ROC-AUC {auc:.3f}: this model ranks cracks hardly better than chance (0.5) and has not learned "
            f"to tell them apart; {advice}")


def _prepare_data(config: TrainConfig, run_dir: Path, checkpoint: tuple[dict, dict] | None,
                  say: Callable[..., None]) -> tuple[Dataset, str, str, dict[str, int]]:
    """Decode the data, split it (or reuse a resumed run's split), and write split.csv and skipped.csv."""
    dataset = load_dataset(config.data, config.input_size, crack_class=config.crack_class, quiet=config.quiet)
    if checkpoint is not None:
        # The epochs so far were trained on the data split.csv records; resuming on other data would mix two
        # datasets in one model and one split record, so a changed folder is refused, and the record kept.
        recorded = read_split(run_dir / "split.csv")
        changes = split_changes(dataset, recorded)
        if changes:
            raise DataError(f"{config.data}: the data changed since this run started ({'; '.join(changes)}); "
                            "resume with the data it started with, or start a new run")
        apply_split(dataset, recorded)
        grouping = "reused split.csv"
        split_hash = hashlib.sha256((run_dir / "split.csv").read_bytes()).hexdigest()
    else:
        grouping = assign_groups(dataset, config.manifest, config.run_length)
        try:
            split_groups(dataset, config.val_fraction, config.test_fraction, config.seed)
        except DataError:
            if not grouping.startswith("runs of"):  # a manifest says how the files group: never overruled
                raise
            # Runs of file numbers are a guess that fits the Mendeley data; a small folder of a user's own
            # files (crack_001.jpg ... crack_060.jpg) is one run, and "add images" would not help.
            group_by_file(dataset)
            split_groups(dataset, config.val_fraction, config.test_fraction, config.seed)
            print(f"warning: {grouping} gave a class fewer groups than train, validation and test need; each "
                  "file is its own group instead. If several files come from one photo they may now sit on both "
                  "sides of the split and the test score will be optimistic: give --groups FILE (columns file, "
                  "group) or a smaller --run-length", file=sys.stderr)
            grouping = f"one group per file ({grouping} gave a class too few)"
        split_hash = write_split(dataset, run_dir / "split.csv")
    write_problems(dataset, run_dir / "skipped.csv")
    counts = {s: len(dataset.indices(s)) for s in ("train", "val", "test")}
    say(
        f"data: {len(dataset.samples)} images ({', '.join(f'{k} {v}' for k, v in counts.items())}), "
        f"{len(dataset.problems)} skipped, {len(dataset.duplicates)} duplicates merged; groups: {grouping}; "
        f"crack class: {dataset.classes[dataset.crack_index]}/"
    )
    if dataset.problems:
        say(f"skipped files are listed in {run_dir / 'skipped.csv'}")
    if counts["train"] == 0 or counts["val"] == 0:
        raise DataError("the split left no training or validation images; add data or change the fractions")
    return dataset, grouping, split_hash, counts


def train(config: TrainConfig, resume: str | Path | None = None) -> TrainResult:
    """Train a crack classifier and leave a complete run folder behind.

    Args:
        config: What to train on and how. Ignored except for ``quiet`` when ``resume`` is given: a
            resumed run continues with the configuration it was started with.
        resume: A run folder with a ``checkpoint.safetensors`` to continue from.

    Raises:
        TrainingInterrupted: Ctrl-C; the run folder holds every finished epoch.
        DataError, ModelError: Unusable data or weights, with a message saying what to do.
    """
    from crackscan import plots
    from crackscan.evaluate import compute_metrics, threshold_for_recall, write_report

    started = time.perf_counter()
    if config.input_size not in INPUT_SIZES:  # before minutes of training that would end in an unloadable model
        raise ValueError(f"input size must lie in {INPUT_SIZES.start}..{INPUT_SIZES.stop - 1} px, "
                         f"got {config.input_size}")
    if min(config.head_epochs, config.finetune_epochs) < 0 or config.head_epochs + config.finetune_epochs < 1:
        raise ValueError(f"nothing to train: head epochs {config.head_epochs}, fine-tuning epochs "
                         f"{config.finetune_epochs} (each 0 or more, together at least 1)")
    checkpoint = None
    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / CHECKPOINT).is_file():
            raise FileNotFoundError(f"{run_dir}: no {CHECKPOINT} to resume from (did the first epoch finish?)")
        if (run_dir / MODEL).is_file():
            raise ValueError(f"{run_dir}: this run already finished ({MODEL} is there); nothing to resume")
        quiet = config.quiet
        try:
            config = TrainConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
        except (OSError, ValueError, TypeError, KeyError) as err:
            raise DataError(f"{run_dir / 'config.json'}: the run's configuration cannot be read "
                            f"({type(err).__name__}: {err}); this run cannot be resumed, start a new one") from None
        config.quiet = quiet
        checkpoint = read_checkpoint(run_dir / CHECKPOINT)
        # A kill during a save leaves the temporary file of the atomic write behind; it was never used.
        for stale in run_dir.glob(".*.safetensors.*.tmp"):
            stale.unlink(missing_ok=True)
    else:
        find_classes(Path(config.data), config.crack_class)  # a mistyped folder is the first thing said
        # Absolute paths in config.json: `--resume` works from any folder, not only the one the run began in.
        # (A copy: the caller's config is left as it was.)
        a_file = weights_keyword(config.weights) is None and Path(config.weights).exists()
        config = replace(
            config, data=os.path.abspath(config.data),
            manifest=os.path.abspath(config.manifest) if config.manifest else config.manifest,
            weights=os.path.abspath(config.weights) if a_file else config.weights)
    torch.manual_seed(config.seed)
    say = (lambda *a: None) if config.quiet else (lambda *a: print(*a, flush=True))

    # Weights first: an offline machine learns it must pass --weights before minutes of decoding.
    model = build_model(dropout=config.dropout)
    if checkpoint is None:
        weights_source = load_pretrained_base(model, config.weights)
    else:  # the checkpoint holds every weight, the frozen base's too: the pretrained file is not needed again
        try:
            model.load_state_dict({k[6:]: v for k, v in checkpoint[0].items() if k.startswith("model.")})
        except RuntimeError as err:
            detail = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), str(err))
            raise ModelError(f"{run_dir / CHECKPOINT}: its weights do not fit this crackscan's model ({detail}); "
                             "this run cannot be resumed, start a new one") from None
        # Checkpoints written before the record was kept: named as a fresh run would name it.
        weights_source = checkpoint[1].get("pretrained") or describe_weights(config.weights)
    model.to(memory_format=torch.channels_last)
    if resume is None:  # made once the cheap checks passed: a refused command leaves no run folder behind
        run_dir = new_run_dir(config.out, config.name)
        (run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    say(f"run folder: {run_dir}")
    say(f"pretrained base: {weights_source}")
    try:
        dataset, grouping, split_hash, counts = _prepare_data(config, run_dir, checkpoint, say)
    except BaseException:
        if checkpoint is None:  # nothing trained yet: a refused run leaves no run folder behind
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run_dir / "tensorboard"))
    # Closed however the run ends (finished, interrupted, failed), so TensorBoard gets every scalar written.
    try:
        trainer = Trainer(config, run_dir, model, dataset, writer, started=started)
        trainer.pretrained = weights_source
        trainer.build_caches()
        extra = f" (+{trainer.n_hard_negatives} drawn hard negatives)" if trainer.n_hard_negatives else ""
        say(f"cached base activations for {counts['val']} validation and {counts['train']}{extra} training images "
            f"in {trainer.cache_seconds:.1f}s; {trainer.n_views - 1} augmented view(s) follow during training")
        try:
            trainer.fit(resume=checkpoint)
        except KeyboardInterrupt:
            # Ctrl-C outside an epoch's batches (validation, checkpoint writing): the last checkpoint stands.
            raise TrainingInterrupted(run_dir, trainer.saved_epochs) from None
        # Written after training (a few seconds of plotting the first epoch need not wait for), and by
        # whichever part of a resumed run finishes. Niceties: a failure here must not cost the model file.
        try:
            plots.augmentation_grid(trainer.sample_views, run_dir / "augmentations.png")
            writer.add_images("augmented_samples", torch.from_numpy(trainer.sample_views).permute(0, 3, 1, 2), 0)
        except Exception as err:
            warnings.warn(f"augmentation samples not written ({type(err).__name__}: {err})")
        if not (run_dir / "best.safetensors").is_file():  # every validation loss was NaN (NaN < best is False)
            raise ModelError(f"{run_dir}: no epoch reached a finite validation loss, so there is no model to keep; "
                             "train again with lower learning rates (--head-lr, --finetune-lr)")
        best = load_file(str(run_dir / "best.safetensors"))
        try:
            _describe_architecture(model, config, run_dir, writer)
        except Exception as err:
            warnings.warn(f"architecture summary not written ({type(err).__name__}: {err})")
        model.load_state_dict(best)
        model.eval()

        # Final evaluation with the whole network on full pixels: the same path predict uses.
        meta = make_meta(
            classes=dataset.classes,
            crack_index=dataset.crack_index,
            input_size=config.input_size,
            dropout=config.dropout,
            training=config.to_dict(),
            pretrained=weights_source,
            split_sha256=split_hash,
            grouping=grouping,
            best_epoch=trainer.best_epoch,
        )
        crack_model = CrackModel(module=model.to(memory_format=torch.channels_last), meta=meta)
        val_idx, test_idx = dataset.indices("val"), dataset.indices("test")
        if config.target_recall is not None:
            val_prob = crack_model.crack_probability(dataset.pixels[val_idx])
            y_val = (dataset.labels(val_idx) == dataset.crack_index).astype(int)
            meta["threshold"] = threshold_for_recall(y_val, val_prob, config.target_recall)
            meta["threshold_source"] = f"validation split, target recall {config.target_recall}"
        if config.dense_mosaics:
            from crackscan.dense_head import attach, fit_dense_head

            try:
                fit = fit_dense_head(crack_model, dataset.pixels, dataset.indices("train"), val_idx,
                                     mosaics=config.dense_mosaics, seed=config.seed, say=say)
            except KeyboardInterrupt:
                raise TrainingInterrupted(run_dir, trainer.saved_epochs, after_training=True) from None
            except Exception as err:  # the trained classifier is worth more than its scan head: keep it
                warnings.warn(f"dense head not fitted ({type(err).__name__}: {err}); scans with this model "
                              "average the classifier's head and verify the borders with crops")
            else:
                attach(model, fit)
                meta["dense_head"] = fit.to_meta()
        if config.scan_mosaics and len(val_idx):
            from crackscan.calibrate import calibrate_scan, store

            try:
                calibration = calibrate_scan(crack_model, dataset.pixels, dataset.labels() == dataset.crack_index,
                                             val_idx, photos=config.scan_mosaics, seed=config.seed,
                                             progress=not config.quiet, say=say)
            except KeyboardInterrupt:
                raise TrainingInterrupted(run_dir, trainer.saved_epochs, after_training=True) from None
            except ValueError as err:  # e.g. a validation split without crack-free patches
                warnings.warn(f"scan threshold not chosen ({err}); scans judge their maps at the patch threshold")
            else:
                store(crack_model, calibration, f"{calibration.photos} photo-sized mosaics of the validation split")
        metrics: dict[str, Any] = {}
        if len(test_idx):
            prob = crack_model.crack_probability(dataset.pixels[test_idx])
            y = (dataset.labels(test_idx) == dataset.crack_index).astype(int)
            groups = [dataset.samples[i].group for i in test_idx]
            files = [dataset.samples[i].rel for i in test_idx]
            metrics = compute_metrics(y, prob, meta["threshold"], groups=groups)
            write_report(run_dir / "test", metrics, y, prob, files, dataset.pixels[test_idx], dataset.classes, dataset.crack_index)
            plots.prediction_grid(dataset.pixels[test_idx], y, prob, meta["threshold"], files, dataset.classes, dataset.crack_index, run_dir / "predictions.png")
            writer.add_hparams({"input_size": config.input_size}, {"hparam/test_accuracy": metrics["accuracy"]})
        meta["metrics"] = {"test": metrics, "val_loss": trainer.best_val_loss}
        meta["train_seconds"] = round(time.perf_counter() - started, 1)
        model_path = save_model(run_dir / MODEL, model, meta)
        (run_dir / "model.json").write_text(json.dumps(meta, indent=2))
        (run_dir / "best.safetensors").unlink(missing_ok=True)
        plots.training_curves(trainer.history, run_dir / "curves.png")
        if metrics:
            say(
                f"test: accuracy {metrics['accuracy']:.4f} [{metrics['accuracy_ci'][0]:.4f}, {metrics['accuracy_ci'][1]:.4f}]"
                f", recall {metrics['recall']:.4f}, precision {metrics['precision']:.4f} on {metrics['n']} images"
            )
            warning = chance_warning(metrics, config.weights)
            if warning:
                print(f"warning: {warning}", file=sys.stderr)
        say(f"done in {time.perf_counter() - started:.0f}s. model: {model_path}")
        say(f"curves: {run_dir / 'curves.png'}  |  tensorboard --logdir {run_dir / 'tensorboard'}")
        return TrainResult(run_dir=run_dir, model_path=model_path, metrics=metrics, history=trainer.history,
                           skipped=[f"{p.file}: {p.reason}" for p in dataset.problems])
    finally:
        writer.close()


def _describe_architecture(model: nn.Module, config: TrainConfig, run_dir: Path, writer) -> None:
    """architecture.txt (torchinfo), architecture.png (diagram) and the TensorBoard graph."""
    from torchinfo import summary

    from crackscan import plots

    _set_trainable(model, config.unfreeze_from, "finetune", config.batchnorm)
    stats = summary(
        model,
        input_size=(1, 3, config.input_size, config.input_size),
        col_names=("output_size", "num_params", "trainable"),
        depth=2,
        verbose=0,
        device="cpu",
    )
    header = (
        f"MobileNetV2, input {config.input_size}x{config.input_size}. Phase 1 trains the classifier only; "
        f"phase 2 also trains features[{config.unfreeze_from}:] (marked trainable below).\n\n"
    )
    (run_dir / "architecture.txt").write_text(header + str(stats) + "\n")
    plots.architecture_diagram(model, config.input_size, config.unfreeze_from, run_dir / "architecture.png")
    model.eval()
    try:
        with warnings.catch_warnings():  # torch.jit.trace's deprecation notice is not the user's concern
            warnings.simplefilter("ignore", FutureWarning)
            writer.add_graph(model, torch.zeros(1, 3, config.input_size, config.input_size))
    except Exception as err:  # the graph is a nicety; tracing quirks must not end a run
        print(f"warning: TensorBoard graph not written ({type(err).__name__})")

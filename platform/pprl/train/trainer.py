"""The PPRL-VGAN training loop: one process, CPU or one GPU, runnable inside Ray Train unchanged.

Per iteration (the authors' schedule, train.py@3b51888):
  1. draw a batch and target codes c; make fakes with the generator in inference mode, without gradients;
  2. one discriminator step on the real batch, then a separate one on the fakes;
  3. (deviation ``loss.g_latent``) steps of the latent identity classifier on recent latent means;
  4. ``train.g_steps_per_d`` generator steps, each on a fresh batch with fresh target codes (with the deviation
     ``loss.g_latent_exp``, a linear expression head on the latent mean is trained in the same step).

Distribution is injected, never imported: ``device``, ``rank``/``world_size`` and a ``wrap_model`` hook
(``ray.train.torch.prepare_model`` under Ray). The frozen discriminator of the generator step is the unwrapped
module, so DDP never sees a forward whose parameters get no gradient.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from pprl import storage
from pprl.config import GENERATOR_WEIGHTS, Config
from pprl.models.networks import LatentClassifier, LatentExpressionHead, build_networks, reparameterize
from pprl.train import loss as L
from pprl.train.augment import check_policy, diff_augment
from pprl.train.batches import Batch
from pprl.train.collapse import CollapseDetector
from pprl.train.ema import WeightAverage
from pprl.train.samples import render_grid, save_grid

log = logging.getLogger(__name__)

WrapFn = Callable[[nn.Module], nn.Module]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module under DDP (``.module``) and/or torch.compile (``._orig_mod``)."""
    while True:
        inner = getattr(module, "_orig_mod", None) or getattr(module, "module", None)
        if not isinstance(inner, nn.Module):
            return module
        module = inner


@contextlib.contextmanager
def frozen(*modules: nn.Module):
    """Parameters of ``modules`` need no gradient inside the block (inputs still get theirs)."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def inverse_time_decay(decay: float) -> Callable[[int], float]:
    """Keras' per-iteration ``decay``: lr_t = lr / (1 + decay * t)."""
    return lambda t: 1.0 / (1.0 + decay * t)


class Trainer:
    """Owns the networks, optimisers and schedule; ``train_epoch()`` runs one epoch and returns its metrics."""

    def __init__(
        self,
        config: Config,
        batches: Iterable[Batch],
        *,
        device: str | torch.device | None = None,
        rank: int = 0,
        world_size: int = 1,
        wrap_model: WrapFn | None = None,
        run_dir: str | None = None,
        sample_images: torch.Tensor | None = None,
        steps_per_epoch: int | None = None,
        metrics_hook: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.config = config
        # called on every rank with each epoch's metrics before they are recorded, checked and published;
        # the distributed runner averages them across ranks there (a collective), so all ranks decide alike
        self.metrics_hook = metrics_hook
        self.device = torch.device(device) if device is not None else default_device()
        self.rank, self.world_size = rank, world_size
        self.run_dir = run_dir
        self.batches: Iterator[Batch] = iter(batches)
        self._source = batches
        self.steps_per_epoch = self._resolve_steps(steps_per_epoch)
        check_policy(config.train.augment)
        self.sample_images = sample_images.to(self.device) if sample_images is not None else None
        self.step = 0
        self.epoch = 0
        self.history: list[dict[str, Any]] = []
        self.collapse = CollapseDetector(config.train.collapse_patience, config.model.num_identities)
        self._g_weights = {name: getattr(config.loss, name) for name in GENERATOR_WEIGHTS}
        self._build(wrap_model or (lambda m: m))
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}
        self._images_seen = 0
        self._tb = None

    # ----------------------------------------------------------------------------------------------- setup
    def _resolve_steps(self, explicit: int | None) -> int:
        tc = self.config.train
        steps = explicit or tc.steps_per_epoch
        if not steps:
            n = getattr(self._source, "num_examples", None)
            if n is None:
                raise ValueError("steps per epoch unknown: set train.steps_per_epoch or pass a source with num_examples")
            steps = n // (tc.batch_size * self.world_size)
        if steps < 1:
            raise ValueError(f"steps per epoch is {steps}: the training set is smaller than train.batch_size={tc.batch_size}")
        return int(steps)

    def _build(self, wrap: WrapFn) -> None:
        cfg, dev = self.config, self.device
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        self.encoder, self.decoder, self.disc = (m.to(dev) for m in build_networks(cfg.model))
        self.latent_adv = LatentClassifier(cfg.model).to(dev) if cfg.loss.g_latent > 0 else None
        self.latent_exp = LatentExpressionHead(cfg.model).to(dev) if cfg.loss.g_latent_exp > 0 else None
        self.gpu = dev.type == "cuda"
        if self.gpu and cfg.train.channels_last:
            for m in (self.encoder, self.decoder, self.disc):
                m.to(memory_format=torch.channels_last)
        compile_ = torch.compile if cfg.train.compile else (lambda m: m)
        self.enc_fwd = compile_(wrap(self.encoder))
        self.dec_fwd = compile_(wrap(self.decoder))
        self.disc_fwd = compile_(wrap(self.disc))
        self.disc_frozen = compile_(self.disc) if cfg.train.compile else self.disc
        self.adv_fwd = wrap(self.latent_adv) if self.latent_adv is not None else None
        self.latent_exp_fwd = wrap(self.latent_exp) if self.latent_exp is not None else None
        oc = cfg.optim

        def rmsprop(*modules: nn.Module) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
            params = [p for m in modules for p in m.parameters()]
            opt = torch.optim.RMSprop(params, lr=oc.lr, alpha=oc.alpha, eps=oc.eps)
            return opt, torch.optim.lr_scheduler.LambdaLR(opt, inverse_time_decay(oc.decay))

        self.g_opt, self.g_sched = rmsprop(self.encoder, self.decoder)
        self.d_opt, self.d_sched = rmsprop(self.disc)
        self.ema = WeightAverage(self._generator_parts(), cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
        self.adv_opt = torch.optim.Adam(self.latent_adv.parameters(), lr=oc.latent_lr) if self.latent_adv is not None else None
        self.latent_exp_opt = torch.optim.Adam(self.latent_exp.parameters(), lr=oc.latent_lr) if self.latent_exp is not None else None
        self._g_cotrained = [self.latent_exp_opt] if self.latent_exp_opt is not None else []  # step with g_opt
        self._buffer_means = torch.zeros(0, cfg.model.latent_dim, device=dev)
        self._buffer_ids = torch.zeros(0, dtype=torch.long, device=dev)
        torch.manual_seed(cfg.train.seed + 1009 * self.rank)  # dropout and sampling noise differ per rank
        self.generator = torch.Generator().manual_seed(cfg.train.seed * 7919 + self.rank)

    def _autocast(self):
        if self.gpu and self.config.train.bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _next(self) -> Batch:
        x, y_id, y_exp = next(self.batches)
        self._images_seen += len(x)
        fmt = torch.channels_last if self.gpu and self.config.train.channels_last else torch.contiguous_format
        x = x.to(self.device, non_blocking=True).contiguous(memory_format=fmt)
        return x, y_id.to(self.device, non_blocking=True), y_exp.to(self.device, non_blocking=True)

    def _targets(self, n: int) -> torch.Tensor:
        """Target codes c ~ U{0..N_id-1}, independent per sample; the source's own identity is not excluded."""
        return torch.randint(self.config.model.num_identities, (n,), generator=self.generator).to(self.device)

    # ----------------------------------------------------------------------------------------------- steps
    def train_step(self) -> None:
        """One discriminator iteration (real step, fake step, latent classifier) and its generator steps.

        The first ``train.d_warmup_steps`` iterations only run the real step (a deviation, 0 in the paper presets):
        the discriminator's identity and expression heads then judge from the first generator step on."""
        tc = self.config.train
        if self.step < tc.d_warmup_steps:
            self.d_real_step(*self._next())
        else:
            self.d_step(self._next())
            for _ in range(tc.g_steps_per_d):
                self.g_step(self._next())
            if self.ema is not None:
                self.ema.update(self._generator_parts())
        self.step += 1

    def _generator_parts(self) -> dict[str, nn.Module]:
        return {"encoder": self.encoder, "decoder": self.decoder}

    def rendering_networks(self) -> tuple[nn.Module, nn.Module]:
        """(encoder, decoder) that samples, the tune objective and the bundle use: the weight average when enabled."""
        if self.ema is not None and self.ema.started:
            return self.ema.averaged["encoder"], self.ema.averaged["decoder"]
        return self.encoder, self.decoder

    @torch.no_grad()
    def make_fakes(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fakes as Keras ``predict`` made them: inference mode (BN running stats, no dropout), sampled z, no gradient."""
        self.enc_fwd.eval()
        self.dec_fwd.eval()
        with self._autocast():
            mean, logvar = self.enc_fwd(x)
            fake = self.dec_fwd(reparameterize(mean, logvar), c)
        self.enc_fwd.train()
        self.dec_fwd.train()
        return fake, mean.float()

    def d_step(self, batch: Batch) -> None:
        """The authors' two discriminator steps: real batch, then its fakes (AC-GAN style targets c and y_exp)."""
        x, y_id, y_exp = batch
        c = self._targets(len(x))
        fake, mean = self.make_fakes(x, c)
        self.d_real_step(x, y_id, y_exp)
        lc = self.config.loss
        fake_t = L.noisy_labels(len(x), lc.fake_label, self.generator, self.device)
        with self._autocast():
            heads = self.disc_fwd(self._augment(fake))
            loss = L.discriminator_loss(heads, fake_t, c, y_exp, lc.d_fake, "d_fake")
        self._update(self.d_opt, self.d_sched, loss.total)
        self._record(loss.parts, {"d_fake_acc": (heads[0].detach() < 0).float().mean()})
        if self.adv_fwd is not None:
            self.latent_step(mean, y_id)

    def d_real_step(self, x: torch.Tensor, y_id: torch.Tensor, y_exp: torch.Tensor) -> None:
        lc = self.config.loss
        self.disc_fwd.train()
        real_t = L.noisy_labels(len(x), lc.real_label, self.generator, self.device)
        with self._autocast():
            heads = self.disc_fwd(self._augment(x))
            loss = L.discriminator_loss(heads, real_t, y_id, y_exp, lc.d_real, "d_real")
        self._update(self.d_opt, self.d_sched, loss.total)
        self._record(loss.parts, {
            "d_real_acc": (heads[0].detach() > 0).float().mean(),
            "d_id_acc": L.accuracy(heads[1].detach(), y_id),
            "d_exp_acc": L.accuracy(heads[2].detach(), y_exp),
        })

    def latent_step(self, mean: torch.Tensor, y_id: torch.Tensor) -> None:
        """Train the latent identity classifier on inference-mode latent means (what an attacker sees).

        It learns from a ring buffer of recent means, several updates per iteration, so that it keeps up with an
        encoder that is trained to fool it (one step per batch lags behind and the encoder wins trivially)."""
        tc = self.config.train
        self._buffer_means = torch.cat([mean, self._buffer_means])[: tc.latent_buffer]
        self._buffer_ids = torch.cat([y_id, self._buffer_ids])[: tc.latent_buffer]
        n = len(self._buffer_means)
        for _ in range(tc.latent_steps_per_d):
            idx = torch.randint(n, (min(n, 4 * len(mean)),), generator=self.generator).to(self.device)
            logits = self.adv_fwd(self._buffer_means[idx])
            loss = torch.nn.functional.cross_entropy(logits.float(), self._buffer_ids[idx])
            self._update(self.adv_opt, None, loss)
        self._record({"latent_id_ce": loss.detach(), "latent_id_acc": L.accuracy(logits.detach(), self._buffer_ids[idx])})

    def g_step(self, batch: Batch) -> None:
        x, y_id, y_exp = batch
        lc = self.config.loss
        n = len(x)
        c = self._targets(n)
        with self._autocast():
            mean, logvar = self.enc_fwd(x)
            z = reparameterize(mean, logvar)
            if lc.g_recon > 0:  # one decoder pass for both codes: DDP allows one forward per backward
                fake, rec = self.dec_fwd(torch.cat([z, z]), torch.cat([c, y_id])).split(n)
            else:
                fake, rec = self.dec_fwd(z, c), None
            with frozen(*self._judges()):
                heads = self.disc_frozen(self._augment(fake))
                latent_logits = self.latent_adv(mean) if self.latent_adv is not None else None
            latent_exp_logits = self.latent_exp_fwd(mean) if self.latent_exp_fwd is not None else None
            extras = L.GeneratorExtras(recon=(rec, x) if rec is not None else None, latent_logits=latent_logits,
                                       latent_exp_logits=latent_exp_logits, cycle=self._latent_cycle(x, fake))
            g = L.generator_loss(heads, c, y_exp, mean, logvar, self._g_weights, extras)
        self._update(self.g_opt, self.g_sched, g.total, *self._g_cotrained)
        self._record(g.parts, {"g_id_acc": L.accuracy(heads[1].detach(), c), "g_exp_acc": L.accuracy(heads[2].detach(), y_exp)})

    def _latent_cycle(self, x: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The averaged encoder's latent means of the fakes and of their sources (``loss.g_cycle``).

        Whatever the target identity, the render must carry its source's latent (expression, pose) visibly enough for
        an encoder to read it back. The weight-averaged encoder judges: it is frozen, so the generator cannot teach it
        to read a code hidden in the pixels. None until the average has started (after the first generator steps)."""
        if self.config.loss.g_cycle == 0 or not self.ema.started:
            return None
        judge = self.ema.averaged["encoder"]
        with torch.no_grad():
            anchor = judge(x)[0]
        return judge(fake)[0], anchor

    def _judges(self) -> list[nn.Module]:
        """Networks that only judge the generator step: D and the latent classifier (their optimisers step elsewhere)."""
        return [self.disc] + ([self.latent_adv] if self.latent_adv is not None else [])

    def _augment(self, images: torch.Tensor) -> torch.Tensor:
        policy = self.config.train.augment
        return diff_augment(images, policy) if policy else images

    @staticmethod
    def _update(opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler | None, loss: torch.Tensor,
                *cotrained: torch.optim.Optimizer) -> None:
        """One optimiser step on ``loss``; ``cotrained`` optimisers (heads trained by the same loss) step with it."""
        for o in (opt, *cotrained):
            o.zero_grad(set_to_none=True)
        loss.backward()
        for o in (opt, *cotrained):
            o.step()
        if sched is not None:
            sched.step()

    def _record(self, *parts: dict[str, torch.Tensor]) -> None:
        for d in parts:
            for name, value in d.items():
                value = value.detach().float()
                self._sums[name] = self._sums[name] + value if name in self._sums else value
                self._counts[name] = self._counts.get(name, 0) + 1

    def _drain(self) -> dict[str, float]:
        means = {k: float(v) / self._counts[k] for k, v in self._sums.items()}
        self._sums, self._counts = {}, {}
        return means

    # ----------------------------------------------------------------------------------------------- epochs
    def train_epoch(self) -> dict[str, Any]:
        """Run ``steps_per_epoch`` iterations; returns (and on rank 0 records) the epoch's mean metrics."""
        tc = self.config.train
        start = time.perf_counter()
        self._images_seen = 0
        for i in range(self.steps_per_epoch):
            self.train_step()
            if tc.log_every and (i + 1) % tc.log_every == 0 and self.rank == 0:
                snap = {k: float(v) / self._counts[k] for k, v in self._sums.items() if k in ("d_real_bce", "g_id", "g_exp", "g_recon")}
                log.info("epoch %d step %d/%d %s", self.epoch + 1, i + 1, self.steps_per_epoch, " ".join(f"{k}={v:.3f}" for k, v in snap.items()))
        if self.gpu:
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - start
        self.epoch += 1
        metrics: dict[str, Any] = {
            "epoch": self.epoch,
            "step": self.step,
            **self._drain(),
            "lr": self.g_sched.get_last_lr()[0],
            "images_per_s": self._images_seen / elapsed,
            "epoch_time_s": elapsed,
        }
        if self.metrics_hook:
            self.metrics_hook(metrics)
        self.history.append(metrics)
        reason = self.collapse.check(self.history)
        metrics["collapsed"] = bool(reason)
        metrics["collapse_reason"] = reason
        if reason:
            log.warning("possible collapse at epoch %d: %s", self.epoch, reason)
        if self.rank == 0:
            self._publish(metrics)
        return metrics

    def fit(self, epochs: int | None = None, on_epoch: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
        """Train until ``epochs`` (default ``train.epochs``) have run in total; ``on_epoch`` sees each epoch's metrics."""
        target = epochs if epochs is not None else self.config.train.epochs
        out = []
        while self.epoch < target:
            metrics = self.train_epoch()
            out.append(metrics)
            if on_epoch:
                on_epoch(metrics)
        return out

    # ----------------------------------------------------------------------------------------------- outputs
    def _publish(self, metrics: dict[str, Any]) -> None:
        log.info(
            "epoch %d: %s",
            self.epoch,
            " ".join(f"{k}={v:.3f}" for k, v in metrics.items() if isinstance(v, float)),
        )
        if not self.run_dir:
            return
        self._write_metrics_csv()
        self._write_tensorboard(metrics)
        if self.sample_images is not None:
            grid = self.sample_grid()
            scale = max(1, 64 // self.config.model.image_size)  # small models are upscaled so the grid is viewable
            save_grid(grid, storage.join(self.run_dir, "samples", f"epoch_{self.epoch:04d}.png"), scale=scale)

    def sample_grid(self) -> np.ndarray:
        """The grid for the fixed sample inputs (rows) rendered as every identity (columns)."""
        return render_grid(*self.rendering_networks(), self.sample_images, self.config.model.num_identities)

    def _write_metrics_csv(self) -> None:
        keys: list[str] = []
        for row in self.history:
            keys += [k for k in row if k not in keys]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=keys)
        writer.writeheader()
        writer.writerows(self.history)
        storage.write_text(storage.join(self.run_dir, "metrics.csv"), buf.getvalue())

    def _write_tensorboard(self, metrics: dict[str, Any]) -> None:
        if storage.is_s3(self.run_dir):
            return  # TensorBoard's writer needs a local folder; metrics.csv still lands on S3
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=storage.join(self.run_dir, "tensorboard"))
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self._tb.add_scalar(f"train/{name}", value, self.epoch)
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    # ----------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Everything a restart needs: networks, optimisers, schedulers, counters, RNG streams, data position, config."""
        state: dict[str, Any] = {
            "config": self.config.to_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "history": self.history,
            "encoder": self.encoder.state_dict(),
            "decoder": self.decoder.state_dict(),
            "discriminator": self.disc.state_dict(),
            "g_opt": self.g_opt.state_dict(),
            "d_opt": self.d_opt.state_dict(),
            "g_sched": self.g_sched.state_dict(),
            "d_sched": self.d_sched.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "generator": self.generator.get_state()},
        }
        if self.gpu:
            state["rng"]["cuda"] = torch.cuda.get_rng_state(self.device)
        if self.latent_adv is not None:
            state |= {
                "latent_adv": self.latent_adv.state_dict(),
                "adv_opt": self.adv_opt.state_dict(),
                "latent_buffer": {"means": self._buffer_means, "ids": self._buffer_ids},
            }
        if self.latent_exp is not None:
            state |= {"latent_exp": self.latent_exp.state_dict(), "latent_exp_opt": self.latent_exp_opt.state_dict()}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        if hasattr(self._source, "state_dict"):
            state["data"] = self._source.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = Config.from_dict(state["config"])
        if saved.model != self.config.model:
            raise ValueError("checkpoint was trained with a different model config; load it with the config saved in it")
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.history = list(state["history"])
        self.encoder.load_state_dict(state["encoder"])
        self.decoder.load_state_dict(state["decoder"])
        self.disc.load_state_dict(state["discriminator"])
        for name in ("g_opt", "d_opt", "g_sched", "d_sched"):
            getattr(self, name).load_state_dict(state[name])
        if self.latent_adv is not None:
            if "latent_adv" not in state:
                raise _missing_in_checkpoint("latent adversary", "loss.g_latent")
            self.latent_adv.load_state_dict(state["latent_adv"])
            self.adv_opt.load_state_dict(state["adv_opt"])
            self._buffer_means = state["latent_buffer"]["means"].to(self.device)
            self._buffer_ids = state["latent_buffer"]["ids"].to(self.device)
        if self.latent_exp is not None:
            if "latent_exp" not in state:
                raise _missing_in_checkpoint("latent expression head", "loss.g_latent_exp")
            self.latent_exp.load_state_dict(state["latent_exp"])
            self.latent_exp_opt.load_state_dict(state["latent_exp_opt"])
        if self.ema is not None and "ema" in state:
            self.ema.load_state_dict(state["ema"])
        torch.set_rng_state(state["rng"]["torch"])
        self.generator.set_state(state["rng"]["generator"])
        if self.gpu and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        if "data" in state and hasattr(self._source, "load_state_dict"):
            self._source.load_state_dict(state["data"])

    def parameter_digest(self) -> str:
        """sha256 (hex) of every trained parameter: the networks, the optional latent heads and the weight averages.

        Under DDP every rank must hold the same value after each step (identical initial weights, averaged gradients);
        BatchNorm statistics are left out, since each rank keeps its own (``forward_sync_buffers=False``)."""
        parts = {"encoder": self.encoder, "decoder": self.decoder, "discriminator": self.disc,
                 "latent_adv": self.latent_adv, "latent_exp": self.latent_exp}
        if self.ema is not None:
            parts |= {f"ema.{name}": module for name, module in self.ema.averaged.items()}
        digest = hashlib.sha256()
        for part, module in parts.items():
            for name, param in module.named_parameters() if module is not None else []:
                digest.update(f"{part}.{name}".encode())
                digest.update(param.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def networks(self) -> dict[str, nn.Module]:
        """The plain (unwrapped) networks that make a bundle (the weight-averaged encoder and decoder when enabled)."""
        encoder, decoder = self.rendering_networks()
        return {"encoder": encoder, "decoder": decoder, "discriminator": self.disc}


def _missing_in_checkpoint(part: str, weight: str) -> ValueError:
    return ValueError(f"checkpoint has no {part} but {weight} > 0: it was trained with another loss config; "
                      "resume it with that config or start a new run name")

"""One configuration system for the whole platform: typed dataclasses plus YAML presets.

A run's configuration is assembled here (preset -> YAML file -> dotted overrides), validated, and
saved with the run as ``config.yaml``. Every component reads its own section; nothing else parses flags.

    cfg = load_config(preset="cpu-quick", overrides=["train.epochs=3", "loss.g_id=0.8"])
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

PRESET_DIR = Path(__file__).parent / "presets"
EXPRESSIONS = ("anger", "disgust", "fear", "joy", "neutral", "sadness", "surprise")


@dataclass
class ModelConfig:
    """PPRL-VGAN networks (see docs/model.md for every deviation from the authors' Keras code)."""

    image_size: int = 64  # square input/output side in pixels; a power of two >= 16
    channels: int = 3  # RGB
    num_identities: int = 6  # N_id: size of the one-hot target code and of D's identity head
    num_expressions: int = 7  # N_exp: FERG's seven expressions
    kernel_size: int = 5  # 5 for FERG, 8 for MUG
    encoder_widths: tuple[int, ...] = (32, 64, 128, 256)  # one stride-2 conv per entry
    decoder_widths: tuple[int, ...] = (256, 128, 128)  # inner transposed convs; a final one makes RGB
    decoder_seed_channels: int = 128  # dense -> (seed_channels, s/16, s/16)
    disc_widths: tuple[int, ...] = (32, 64, 128, 256)
    disc_dense: int = 256
    latent_dim: int = 128
    encoder_dropout: float = 0.3
    disc_dropout: float = 0.5
    faithful: bool = False  # authors' quirks: sigmoid log-variance, TF 'same' padding, Glorot init
    # deviation (inference only; 0 = paper: the encoder's mean): bundles export as ``latent`` the face rendered as
    # identity canonical_identity and encoded again, latent_cycles times over (docs/model.md, "Canonical re-encoding")
    latent_cycles: int = 0
    canonical_identity: int = 0
    # deviation: the exported latent passes through a linear identity eraser (LEACE) fitted on the training faces
    # when the bundle is exported (pprl.eraser; docs/model.md, "Identity eraser")
    erase_identity: bool = False

    def __post_init__(self) -> None:
        self.encoder_widths = tuple(self.encoder_widths)
        self.decoder_widths = tuple(self.decoder_widths)
        self.disc_widths = tuple(self.disc_widths)
        downs = len(self.encoder_widths)
        if self.image_size % (2**downs) or self.image_size < 2**downs:
            raise ValueError(
                f"model.image_size={self.image_size} must be a multiple of 2**{downs} "
                f"(one halving per encoder layer); try 32 or 64"
            )
        if len(self.decoder_widths) + 1 != downs:
            raise ValueError("model.decoder_widths needs one entry fewer than model.encoder_widths")
        if self.latent_cycles < 0 or not 0 <= self.canonical_identity < self.num_identities:
            raise ValueError(f"model.latent_cycles must be >= 0 and model.canonical_identity in 0..{self.num_identities - 1}, "
                             f"got {self.latent_cycles} and {self.canonical_identity}")
        if self.num_identities < 2 or self.num_expressions < 2:
            raise ValueError("model.num_identities and model.num_expressions must be >= 2")


GENERATOR_WEIGHTS = ("g_kl", "g_adv", "g_id", "g_exp", "g_recon", "g_latent", "g_latent_exp", "g_cycle")  # LossConfig's generator terms


@dataclass
class LossConfig:
    """Loss weights. Defaults are the authors' FERG values (train.py@3b51888)."""

    d_real: tuple[float, float, float] = (0.25, 0.5, 0.25)  # (real/fake, identity, expression) on real images
    d_fake: tuple[float, float, float] = (0.25, 0.5, 0.25)  # same on fakes, AC-GAN style (id target = c)
    g_kl: float = 0.002
    g_adv: float = 0.108
    g_id: float = 0.6  # identity head must see the target code c
    g_exp: float = 0.29  # expression head must see the source expression
    g_recon: float = 0.0  # deviation: L1 self-reconstruction with the source identity code (0 = paper)
    g_latent: float = 0.0  # deviation: the encoder's latent mean must fool an identity classifier (0 = paper)
    g_latent_exp: float = 0.0  # deviation: a linear head on the latent mean must read the source expression (0 = paper)
    g_cycle: float = 0.0  # deviation: the averaged encoder must read the source's latent back from each render (needs ema)
    real_label: tuple[float, float] = (0.9, 1.0)  # noisy label smoothing ranges
    fake_label: tuple[float, float] = (0.0, 0.1)

    def __post_init__(self) -> None:
        self.d_real = tuple(self.d_real)
        self.d_fake = tuple(self.d_fake)
        self.real_label = tuple(self.real_label)
        self.fake_label = tuple(self.fake_label)
        for name in GENERATOR_WEIGHTS:
            if getattr(self, name) < 0:
                raise ValueError(f"loss.{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class OptimConfig:
    """RMSprop as in Keras 2.0.2: rho 0.9, eps 1e-8, inverse-time decay per step."""

    lr: float = 3e-4
    alpha: float = 0.9
    eps: float = 1e-8
    decay: float = 1e-6  # lr_t = lr / (1 + decay * t)
    latent_lr: float = 1e-3  # Adam learning rate of the latent heads (the loss.g_latent and loss.g_latent_exp deviations)


@dataclass
class TrainConfig:
    batch_size: int = 256
    epochs: int = 400
    steps_per_epoch: int = 0  # 0 = floor(N_train / batch_size), as the authors did
    g_steps_per_d: int = 2  # generator updates per discriminator iteration, each on a fresh batch
    d_warmup_steps: int = 0  # deviation: first iterations train only D on real images (0 = paper)
    augment: str = ""  # deviation: DiffAugment policy for every D input, e.g. "translation" or "translation,color" ("" = paper)
    ema_decay: float = 0.0  # deviation: samples, tune and the bundle use a moving average of E and D's weights (0 = paper)
    seed: int = 0
    bf16: bool = True  # autocast on GPU only
    channels_last: bool = True  # GPU only
    compile: bool = False  # torch.compile the networks
    num_workers: int = 2  # DataLoader worker processes
    sample_rows: int = 6  # test inputs shown in the per-epoch sample grid
    collapse_patience: int = 3  # epochs of pinned D accuracy / flat identity loss before flagging collapse
    log_every: int = 20  # steps between log lines
    latent_steps_per_d: int = 4  # latent-classifier updates per iteration (loss.g_latent > 0 only)
    latent_buffer: int = 2048  # recent latent means the latent classifier trains on


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    preset: str = "paper-ferg"

    def __post_init__(self) -> None:
        if self.loss.g_cycle > 0 and self.train.ema_decay == 0:
            raise ValueError("loss.g_cycle > 0 needs train.ema_decay > 0: the weight-averaged encoder judges the cycle "
                             "(set loss.g_cycle=0 as well to train without the average)")

    def to_dict(self) -> dict[str, Any]:
        return _plain(asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        return _build(cls, data, prefix="")


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: list[str] | None = None,
) -> Config:
    """Preset, then a YAML file on top, then ``section.field=value`` overrides on top of that."""
    data: dict[str, Any] = {}
    if preset:
        path = PRESET_DIR / f"{preset}.yaml"
        if not path.exists():
            raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(list_presets())}")
        data = yaml.safe_load(path.read_text()) or {}
        data["preset"] = preset
    if config_file:
        from pprl.storage import read_text

        extra = yaml.safe_load(read_text(str(config_file))) or {}
        if not isinstance(extra, dict):
            raise ValueError(f"{config_file}: expected a mapping of config sections")
        data = _deep_merge(data, extra)
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or "." not in key:
            raise ValueError(f"override {item!r} must look like section.field=value, e.g. train.epochs=5")
        section, _, name = key.partition(".")
        data.setdefault(section, {})[name] = yaml.safe_load(raw)
    return Config.from_dict(data)


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"config section {prefix.rstrip('.') or '<root>'} must be a mapping")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(
            f"unknown config field(s) {', '.join(prefix + u for u in sorted(unknown))}; "
            f"{prefix.rstrip('.') or 'config'} has: {', '.join(sorted(known))}"
        )
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, prefix=f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, f"{prefix}{name}")
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, name: str) -> Any:
    origin = typing.get_origin(hint)
    try:
        if origin is tuple:
            args = typing.get_args(hint)
            item_type = args[0]
            if not isinstance(value, (list, tuple)):
                raise TypeError
            values = tuple(item_type(v) for v in value)
            if args[-1] is not Ellipsis and len(values) != len(args):
                raise ValueError(f"{name} needs {len(args)} values, got {len(values)}")
            return values
        if hint is bool:
            if isinstance(value, bool):
                return value
            raise TypeError
        if hint in (int, float, str):
            if hint is int and isinstance(value, float) and not value.is_integer():
                raise TypeError
            return hint(value)
    except (TypeError, ValueError) as err:
        if isinstance(err, ValueError) and str(err).startswith(name):
            raise
        raise ValueError(f"config field {name}: cannot use {value!r} as {getattr(hint, '__name__', hint)}") from None
    return value


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj

"""PPRL-VGAN networks: encoder, decoder and the three-headed discriminator.

Built from ``ModelConfig``; the authors' FERG configuration (kernel 5, widths 32/64/128/256, z 128) is the default.
Networks return outputs only (logits, never probabilities): losses live in ``pprl.train.loss``.
``faithful=True`` reproduces the authors' Keras quirks (see docs/model.md): a sigmoid on the log-variance,
TensorFlow's asymmetric 'same' padding for odd kernels, and Glorot-uniform initialisation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pprl.config import ModelConfig

BN_MOMENTUM = 0.2  # Keras BatchNormalization(momentum=0.8) keeps 0.8 of the old running stats
BN_EPS = 1e-3  # Keras default
LEAKY_SLOPE = 0.2


def tf_same_pads(kernel: int) -> tuple[int, int]:
    """(before, after) padding of TensorFlow's stride-2 'same' for an even input: odd kernels pad one more after."""
    total = kernel - 2
    return total // 2, total - total // 2


class DownConv(nn.Module):
    """Stride-2 convolution that halves the side: PyTorch symmetric padding, or TF 'same' when ``faithful``."""

    def __init__(self, cin: int, cout: int, kernel: int, faithful: bool) -> None:
        super().__init__()
        self.pads = tf_same_pads(kernel) if faithful else None
        padding = 0 if faithful else (kernel - 1) // 2
        self.conv = nn.Conv2d(cin, cout, kernel, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pads:
            before, after = self.pads
            x = F.pad(x, (before, after, before, after))
        return self.conv(x)


class UpConv(nn.Module):
    """Stride-2 transposed convolution that doubles the side; ``faithful`` crops like TF's conv2d_transpose 'same'."""

    def __init__(self, cin: int, cout: int, kernel: int, faithful: bool) -> None:
        super().__init__()
        self.crop = tf_same_pads(kernel)[0] if faithful else None
        padding = (kernel - 1) // 2
        if faithful:
            self.conv = nn.ConvTranspose2d(cin, cout, kernel, stride=2)
        else:
            self.conv = nn.ConvTranspose2d(cin, cout, kernel, stride=2, padding=padding, output_padding=2 + 2 * padding - kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        if self.crop is not None:
            side = 2 * x.shape[-1]
            out = out[..., self.crop : self.crop + side, self.crop : self.crop + side]
        return out


class EncoderBlock(nn.Sequential):
    """Conv -> BatchNorm -> Dropout -> LeakyReLU, the authors' order."""

    def __init__(self, cin: int, cout: int, cfg: ModelConfig) -> None:
        super().__init__(
            DownConv(cin, cout, cfg.kernel_size, cfg.faithful),
            nn.BatchNorm2d(cout, momentum=BN_MOMENTUM, eps=BN_EPS),
            nn.Dropout(cfg.encoder_dropout),
            nn.LeakyReLU(LEAKY_SLOPE),
        )


class DecoderBlock(nn.Sequential):
    """ConvTranspose -> ReLU -> BatchNorm: Keras applies the layer's activation before the following BN."""

    def __init__(self, cin: int, cout: int, cfg: ModelConfig) -> None:
        super().__init__(
            UpConv(cin, cout, cfg.kernel_size, cfg.faithful),
            nn.ReLU(),
            nn.BatchNorm2d(cout, momentum=BN_MOMENTUM, eps=BN_EPS),
        )


class Encoder(nn.Module):
    """Image (N, 3, S, S) in [-1, 1] -> (mean, logvar), each (N, latent_dim)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        widths = (cfg.channels, *cfg.encoder_widths)
        self.blocks = nn.Sequential(*(EncoderBlock(a, b, cfg) for a, b in zip(widths, widths[1:], strict=False)))
        side = cfg.image_size // 2 ** len(cfg.encoder_widths)
        flat = cfg.encoder_widths[-1] * side * side
        self.mean = nn.Linear(flat, cfg.latent_dim)
        self.logvar = nn.Linear(flat, cfg.latent_dim)
        self.sigmoid_logvar = cfg.faithful  # authors: logvar in (0, 1), so the posterior std is never below 1
        if cfg.faithful:
            glorot_init(self)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.flatten(self.blocks(x), 1)
        logvar = self.logvar(h)
        if self.sigmoid_logvar:
            logvar = torch.sigmoid(logvar)
        return self.mean(h), logvar


def reparameterize(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """z = mean + exp(logvar / 2) * eps (the FERG version's formula)."""
    return mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)


def canonical_reencoding(encoder: nn.Module, decoder: nn.Module, z: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """The latent exported for latent means ``z``: the mean of the face rendered from ``z`` as identity
    ``cfg.canonical_identity`` and encoded again, ``cfg.latent_cycles`` times over (the ``model.latent_cycles``
    deviation; with 0, ``z`` itself: the paper's encoder mean).

    Each cycle encodes a face that shows the canonical person with the source's expression and pose: whatever the
    first encoding kept of the source's identity must survive a rendering as someone else to be read again. Each
    cycle costs one decoder and one encoder pass (docs/model.md, "Canonical re-encoding")."""
    codes = torch.full((len(z),), cfg.canonical_identity, dtype=torch.long, device=z.device)
    for _ in range(cfg.latent_cycles):
        z = encoder(decoder(z, codes))[0]
    return z


class Decoder(nn.Module):
    """(z, target identity) -> image (N, 3, S, S) in [-1, 1]. The identity is an int tensor or a one-hot/soft code."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_identities = cfg.num_identities
        self.seed_side = cfg.image_size // 2 ** (len(cfg.decoder_widths) + 1)
        self.seed_channels = cfg.decoder_seed_channels
        self.dense = nn.Linear(cfg.latent_dim + cfg.num_identities, self.seed_channels * self.seed_side**2)
        widths = (cfg.decoder_seed_channels, *cfg.decoder_widths)
        self.blocks = nn.Sequential(*(DecoderBlock(a, b, cfg) for a, b in zip(widths, widths[1:], strict=False)))
        self.to_rgb = UpConv(widths[-1], cfg.channels, cfg.kernel_size, cfg.faithful)
        if cfg.faithful:
            glorot_init(self)

    def forward(self, z: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
        code = self.one_hot(identity).to(z.dtype) if identity.dim() == 1 else identity.to(z.dtype)
        h = F.relu(self.dense(torch.cat([z, code], dim=1)))
        h = h.view(-1, self.seed_channels, self.seed_side, self.seed_side)
        return torch.tanh(self.to_rgb(self.blocks(h)))

    def one_hot(self, identity: torch.Tensor) -> torch.Tensor:
        return F.one_hot(identity.long(), self.num_identities).float()


class Discriminator(nn.Module):
    """Image -> (real/fake logit (N,), identity logits (N, N_id), expression logits (N, N_exp)). No BatchNorm."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        widths = (cfg.channels, *cfg.disc_widths)
        layers: list[nn.Module] = []
        for a, b in zip(widths, widths[1:], strict=False):
            layers += [DownConv(a, b, cfg.kernel_size, cfg.faithful), nn.LeakyReLU(LEAKY_SLOPE)]
        self.blocks = nn.Sequential(*layers)
        side = cfg.image_size // 2 ** len(cfg.disc_widths)
        self.dense = nn.Sequential(
            nn.Linear(cfg.disc_widths[-1] * side * side, cfg.disc_dense), nn.LeakyReLU(LEAKY_SLOPE), nn.Dropout(cfg.disc_dropout)
        )
        self.real_fake = nn.Linear(cfg.disc_dense, 1)
        self.identity = nn.Linear(cfg.disc_dense, cfg.num_identities)
        self.expression = nn.Linear(cfg.disc_dense, cfg.num_expressions)
        if cfg.faithful:
            glorot_init(self)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.dense(torch.flatten(self.blocks(x), 1))
        return self.real_fake(h).squeeze(1), self.identity(h), self.expression(h)


def glorot_init(module: nn.Module) -> None:
    """Keras defaults: Glorot-uniform kernels and zero biases (BatchNorm keeps ones/zeros)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)


def build_networks(cfg: ModelConfig) -> tuple[Encoder, Decoder, Discriminator]:
    return Encoder(cfg), Decoder(cfg), Discriminator(cfg)


class LatentClassifier(nn.Module):
    """An MLP guessing the identity from the latent mean: the adversary of the ``loss.g_latent`` deviation."""

    def __init__(self, cfg: ModelConfig, hidden: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(cfg.latent_dim, hidden),
            nn.LeakyReLU(LEAKY_SLOPE),
            nn.Linear(hidden, hidden),
            nn.LeakyReLU(LEAKY_SLOPE),
            nn.Linear(hidden, cfg.num_identities),
        )

    def forward(self, mean: torch.Tensor) -> torch.Tensor:
        return self.net(mean)


class LatentExpressionHead(nn.Module):
    """A linear read-out of the expression from the latent mean, trained with the encoder (``loss.g_latent_exp``).

    It keeps the expression linearly present in the latent while ``loss.g_latent`` pushes identity out, so that the
    adversary removes identity rather than everything it can reach."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.linear = nn.Linear(cfg.latent_dim, cfg.num_expressions)

    def forward(self, mean: torch.Tensor) -> torch.Tensor:
        return self.linear(mean)

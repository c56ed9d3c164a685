"""The networks against the reference brief's tables (docs/model.md), layer by layer, and the port's padding details."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

from pprl.config import ModelConfig, load_config
from pprl.models.networks import DownConv, UpConv, build_networks, tf_same_pads

MODELS_DIR = Path(__file__).resolve().parents[1] / "platform" / "pprl" / "models"

# The reference brief's tables (§1.2-1.4) for 64x64x3 inputs: each conv layer's output (C, H, W).
ENCODER_TABLE = [(32, 32, 32), (64, 16, 16), (128, 8, 8), (256, 4, 4)]
DECODER_TABLE = [(256, 8, 8), (128, 16, 16), (128, 32, 32)]
DISC_TABLE = [(32, 32, 32), (64, 16, 16), (128, 8, 8), (256, 4, 4)]
Z_DIM = 128
DENSE_SEED = 4 * 4 * 128
DISC_DENSE = 256
N_EXP = 7


def conv(k: int, cin: int, cout: int) -> int:
    return k * k * cin * cout + cout


def dense(fin: int, fout: int) -> int:
    return fin * fout + fout


def batchnorm(c: int) -> int:
    return 2 * c  # gamma and beta; running statistics are buffers


def expected_params(k: int, n_id: int) -> dict[str, int]:
    """Parameter counts derived from the tables, one layer at a time."""
    enc_channels = [3] + [c for c, _, _ in ENCODER_TABLE]
    encoder = sum(conv(k, a, b) + batchnorm(b) for a, b in zip(enc_channels, enc_channels[1:], strict=False))
    encoder += 2 * dense(256 * 4 * 4, Z_DIM)  # mean and log-variance heads
    dec_channels = [128] + [c for c, _, _ in DECODER_TABLE]
    decoder = dense(Z_DIM + n_id, DENSE_SEED)
    decoder += sum(conv(k, a, b) + batchnorm(b) for a, b in zip(dec_channels, dec_channels[1:], strict=False))
    decoder += conv(k, 128, 3)  # the final tanh layer, no BN
    disc_channels = [3] + [c for c, _, _ in DISC_TABLE]
    disc = sum(conv(k, a, b) for a, b in zip(disc_channels, disc_channels[1:], strict=False))
    disc += dense(256 * 4 * 4, DISC_DENSE) + dense(DISC_DENSE, 1) + dense(DISC_DENSE, n_id) + dense(DISC_DENSE, N_EXP)
    return {"encoder": encoder, "decoder": decoder, "discriminator": disc}


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def run_recording(layers: list[nn.Module], fn):
    """Call ``fn()`` and return (its result, the output shape of each of ``layers`` without the batch dimension)."""
    shapes: list[tuple[int, ...]] = []
    handles = [m.register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.shape[1:]))) for m in layers]
    try:
        return fn(), shapes
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize(("preset", "kernel", "n_id"), [("paper-ferg", 5, 6), ("paper-mug", 8, 8)])
@pytest.mark.parametrize("faithful", [False, True])
def test_paper_presets_match_the_reference_tables(preset, kernel, n_id, faithful):
    cfg = load_config(preset, overrides=[f"model.faithful={str(faithful).lower()}"]).model
    assert (cfg.kernel_size, cfg.num_identities, cfg.image_size, cfg.latent_dim) == (kernel, n_id, 64, Z_DIM)
    enc, dec, disc = (m.eval() for m in build_networks(cfg))
    x = torch.randn(2, 3, 64, 64)

    (mean, logvar), shapes = run_recording([block[-1] for block in enc.blocks], lambda: enc(x))  # after each LeakyReLU
    assert shapes == ENCODER_TABLE
    assert mean.shape == logvar.shape == (2, Z_DIM)

    dec_layers = [dec.dense, *(block[-1] for block in dec.blocks), dec.to_rgb]  # each block ends in its BatchNorm
    image, shapes = run_recording(dec_layers, lambda: dec(mean, torch.tensor([0, n_id - 1])))
    assert shapes == [(DENSE_SEED,), *DECODER_TABLE, (3, 64, 64)]
    assert image.shape == (2, 3, 64, 64) and image.abs().max() <= 1

    disc_layers = [m for m in disc.blocks if isinstance(m, nn.LeakyReLU)] + [disc.dense[1]]  # dense -> LeakyReLU
    (rf, ids, exps), shapes = run_recording(disc_layers, lambda: disc(image))
    assert shapes == [*DISC_TABLE, (DISC_DENSE,)]
    assert rf.shape == (2,) and ids.shape == (2, n_id) and exps.shape == (2, N_EXP)

    assert {"encoder": count(enc), "decoder": count(dec), "discriminator": count(disc)} == expected_params(kernel, n_id)
    if faithful:
        assert ((logvar > 0) & (logvar < 1)).all(), "the authors' log-variance goes through a sigmoid"
        assert all(m.bias.abs().max() == 0 for m in enc.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))  # Keras zero bias
    else:
        assert (logvar < 0).any(), "the clean default has a linear log-variance"


def test_ferg_parameter_totals_by_hand():
    """One total written out, so a shared mistake in the helpers above cannot hide."""
    # encoder: 2432+64 + 51264+128 + 204928+256 + 819456+512 + 2*524416
    assert expected_params(5, 6)["encoder"] == 2432 + 64 + 51264 + 128 + 204928 + 256 + 819456 + 512 + 2 * 524416


@pytest.mark.parametrize("kernel", [4, 5, 8])
@pytest.mark.parametrize("faithful", [False, True])
def test_transposed_conv_is_the_adjoint_of_the_strided_conv(kernel, faithful):
    """<down(x), y> == <x, up(y)> with shared weights: TF's conv2d_transpose 'same' is the gradient of conv2d 'same',
    so this pins the asymmetric padding (1 before, 2 after for k=5) and the matching crop."""
    torch.manual_seed(0)
    down, up = DownConv(3, 4, kernel, faithful), UpConv(4, 3, kernel, faithful)
    up.conv.weight.data.copy_(down.conv.weight.data)
    nn.init.zeros_(down.conv.bias)
    nn.init.zeros_(up.conv.bias)
    x, y = torch.randn(1, 3, 16, 16, dtype=torch.float64), torch.randn(1, 4, 8, 8, dtype=torch.float64)
    down.double()
    up.double()
    assert down(x).shape == y.shape and up(y).shape == x.shape
    torch.testing.assert_close((down(x) * y).sum(), (x * up(y)).sum())


def test_faithful_padding_is_tensorflow_same():
    assert tf_same_pads(5) == (1, 2)  # odd kernel: the extra row/column goes after
    assert tf_same_pads(8) == (3, 3)
    torch.manual_seed(0)
    layer = DownConv(1, 1, 5, faithful=True)
    x = torch.randn(1, 1, 8, 8)
    manual = nn.functional.conv2d(nn.functional.pad(x, (1, 2, 1, 2)), layer.conv.weight, layer.conv.bias, stride=2)
    torch.testing.assert_close(layer(x), manual)
    clean = DownConv(1, 1, 5, faithful=False)
    clean.conv.load_state_dict(layer.conv.state_dict())
    assert not torch.allclose(clean(x), layer(x)), "the clean default pads symmetrically (shifted by one pixel)"


def test_bad_model_config_names_the_field():
    with pytest.raises(ValueError, match="model.image_size"):
        ModelConfig(image_size=40)


def test_models_package_has_no_ray_or_loss_code():
    for path in MODELS_DIR.glob("*.py"):
        tree = ast.parse(path.read_text())
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        imported |= {(node.module or "").split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert "ray" not in imported, f"{path.name} imports ray"
        assert not any(isinstance(n, ast.ImportFrom) and (n.module or "").startswith("pprl.train") for n in ast.walk(tree))

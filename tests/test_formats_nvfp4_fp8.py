"""NVFP4, FP8 and BF16: the scale rules, hand-checked values, and activations."""

from __future__ import annotations

import pytest
import torch

from bitplan.formats import E2M1, E4M3, BF16Format, FP8Format, NVFP4Format

# ---------------------------------------------------------------- NVFP4


def test_nvfp4_hand_checked_blocks():
    # Tensor amax 2688 = 6 * 448, so the global scale is exactly 1.
    x = torch.zeros(3, 16)
    x[0, :3] = torch.tensor([2688.0, 1344.0, 1120.0])  # block scale 448: 6, 3, 2.5 -> 2
    x[1, :4] = torch.tensor([5.0, 2.5, 1.0, 0.5])  # block scale e4m3(5/6) = 0.8125
    x[2, :3] = torch.tensor([3.0, 1.3, -0.2])  # block scale 0.5: 6, 2.6 -> 3, -0.4 -> -0.5
    result = NVFP4Format().quantize_weight(x)
    assert result[0, :3].tolist() == [2688.0, 1344.0, 896.0]
    # 5 / 0.8125 = 6.15 saturates to 6; 2.5 / 0.8125 = 3.08 -> 3; 1.23 -> 1; 0.615 -> 0.5.
    assert result[1, :4].tolist() == [4.875, 2.4375, 0.8125, 0.40625]
    assert result[2, :3].tolist() == [3.0, 1.5, -0.25]
    assert (result[:, 4:] == 0).all()


def nvfp4_parts(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Global scale and per-element block scale, computed from the rule in the test itself."""
    global_scale = x.abs().max() / (6 * 448)
    padded = torch.nn.functional.pad(x, (0, -x.shape[-1] % 16))
    blocks = padded.reshape(*x.shape[:-1], -1, 16)
    raw = blocks.abs().amax(-1, keepdim=True) / 6 / global_scale
    block_scale = raw.clamp(max=448).to(torch.float8_e4m3fn).float()  # torch as the reference
    block_scale = block_scale.expand_as(blocks).reshape(padded.shape)[..., : x.shape[-1]]
    return global_scale, block_scale


@pytest.mark.parametrize("shape", [(8, 64), (5, 40), (2, 3, 48)])
@pytest.mark.parametrize("magnitude", [1e-4, 1.0, 1e4])
def test_nvfp4_values_are_e2m1_times_e4m3_block_scale_times_global_scale(shape, magnitude):
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(shape, generator=generator) * magnitude
    x[..., :16] *= torch.logspace(-3, 0, x[..., :16].shape[-1])  # spread block maxima
    global_scale, block_scale = nvfp4_parts(x)
    result = NVFP4Format().quantize_activation(x)
    elements = quantize_to_e2m1_reference(x / (block_scale * global_scale))
    assert torch.equal(result, elements * block_scale * global_scale)
    assert torch.isin(elements.abs(), E2M1.grid()).all()
    assert torch.isin(block_scale, E4M3.grid()).all()


def quantize_to_e2m1_reference(x: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 value by brute force, ties to the even code, saturating at 6."""
    grid = E2M1.grid().double()
    distance = (x.double().abs().clamp(max=6).unsqueeze(-1) - grid).abs()
    # A float32 in [0, 6] off a midpoint is at least ~1e-8 from it, so this penalty only decides
    # exact ties: to the even code (even index).
    odd_code_penalty = torch.tensor([0.0, 1e-9] * 4, dtype=torch.float64)
    nearest = (distance + odd_code_penalty).argmin(-1)
    return (torch.sign(x.double()) * grid[nearest]).float()


def test_nvfp4_zero_tensor_and_tiny_blocks():
    assert (NVFP4Format().quantize_weight(torch.zeros(4, 32)) == 0).all()
    x = torch.zeros(2, 32)
    x[0, 0] = 1000.0
    x[1, :16] = 1e-9  # block scale rounds to 0 in E4M3: the block becomes 0, not NaN
    result = NVFP4Format().quantize_weight(x)
    assert torch.isfinite(result).all()
    assert result[0, 0] == 1000.0 and (result[1] == 0).all()


def test_nvfp4_activation_global_scale_is_per_tensor():
    x = torch.randn(2, 4, 32)
    y = x.clone()
    y[0, 0, 0] = 1e4  # raises the tensor's amax, so every block's scales change
    assert not torch.equal(
        NVFP4Format().quantize_activation(y)[1], NVFP4Format().quantize_activation(x)[1]
    )


# ---------------------------------------------------------------- FP8


def test_fp8_weights_use_a_float32_scale_per_row():
    generator = torch.Generator().manual_seed(5)
    w = torch.randn(6, 100, generator=generator) * torch.logspace(-3, 3, 6).unsqueeze(1)
    scale = w.abs().amax(-1, keepdim=True) / 448
    expected = (w / scale).to(torch.float8_e4m3fn).float() * scale
    assert torch.equal(FP8Format().quantize_weight(w), expected)


def test_fp8_activations_are_per_token():
    x = torch.randn(2, 3, 64)
    result = FP8Format().quantize_activation(x)
    assert torch.equal(result, FP8Format().quantize_weight(x.reshape(6, 64)).reshape(2, 3, 64))
    assert torch.equal(result[1, 1], FP8Format().quantize_activation(x[1, 1:2])[0])
    assert FP8Format().quantizes_activations


def test_fp8_zero_rows():
    w = torch.randn(3, 8)
    w[1] = 0
    result = FP8Format().quantize_weight(w)
    assert torch.isfinite(result).all() and (result[1] == 0).all()


# ---------------------------------------------------------------- BF16


def test_bf16_rounds_float32_and_keeps_bf16_exactly():
    w = torch.randn(4, 8)
    assert torch.equal(BF16Format().quantize_weight(w), w.to(torch.bfloat16).float())
    w16 = w.to(torch.bfloat16)
    result = BF16Format().quantize_weight(w16)
    assert torch.equal(result, w16)
    assert result.data_ptr() != w16.data_ptr()  # a new tensor, never an alias
    x = torch.randn(3, 8)
    assert BF16Format().quantize_activation(x) is x
    assert not BF16Format().quantizes_activations

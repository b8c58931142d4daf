import pytest
import torch

from curvtrain.optim.quantize import (_dequantize_torch, _quantize_torch, dequantize_blockwise, dynamic_map, error_bound,
                                     max_error, quantize_blockwise, uses_bitsandbytes, zeros_blockwise)

try:
    import bitsandbytes.functional as bnb
except ImportError:
    bnb = None
needs_bnb = pytest.mark.skipif(bnb is None, reason="bitsandbytes does not import")


def sample(n, signed, seed=0):
    """Values over several decades, as optimizer moments are; squares for the unsigned map."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen) * torch.rand(n, generator=gen) ** 4
    return x if signed else x.square()


# The bound |x − deq(q(x))| ≤ absmax·δ holds up to float32 rounding of absmax·map[code]: slack 1e-6·absmax.


def per_value_absmax(absmax, block_size, n):
    return absmax.repeat_interleave(block_size)[:n]


def test_dynamic_map_layout():
    for signed, lowest, delta in ((True, -0.99297, 0.5 * 0.9 / 64), (False, 0.0, 0.5 * 0.9 / 128)):
        code = dynamic_map(signed)
        assert code.shape == (256,) and code.dtype == torch.float32
        assert torch.all(code.diff() > 0)
        assert code[-1] == 1.0 and (code == 0).any()
        assert code[0].item() == pytest.approx(lowest, abs=1e-5)
        assert max_error(signed) == pytest.approx(delta, rel=1e-4)


@needs_bnb
@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_equals_bitsandbytes(signed):
    assert torch.equal(dynamic_map(signed), bnb.create_dynamic_map(signed=signed))


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("block_size", [64, 256, 1000])
@pytest.mark.parametrize("n", [1, 255, 257, 4097])
def test_round_trip_within_stated_bound(signed, block_size, n):
    x = sample(n, signed, seed=n + block_size)
    codes, absmax = quantize_blockwise(x, block_size, signed=signed)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    assert absmax.dtype == torch.float32 and absmax.shape == (-(-n // block_size),)
    blocks = torch.nn.functional.pad(x.abs(), (0, -n % block_size)).view(-1, block_size)
    assert torch.equal(absmax, blocks.amax(dim=1))
    scale = per_value_absmax(absmax, block_size, n)
    error = (x - dequantize_blockwise(codes, absmax, x.shape, block_size, signed=signed)).abs()
    assert torch.all(error <= scale * (error_bound(signed, "cpu", block_size) + 1e-6))


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("block_size", [64, 1000])
def test_torch_path_picks_the_nearest_code(signed, block_size):
    """The torch path's code is the argmin of |map − x/absmax| (brute force over all 256), so its error ≤ δ."""
    x = sample(3001, signed, seed=block_size)
    codes, absmax = _quantize_torch(x, block_size, signed=signed)
    scale = per_value_absmax(absmax, block_size, x.numel())
    distance = (dynamic_map(signed)[None, :] - (x / scale)[:, None]).abs()
    nearest = distance.min(dim=1).values
    assert torch.all(distance[torch.arange(x.numel()), codes.long()] <= nearest + 1e-7)
    error = (x - _dequantize_torch(codes, absmax, x.shape, block_size, torch.float32, signed=signed)).abs()
    assert torch.all(error <= scale * (max_error(signed) + 1e-6))


@needs_bnb
def test_bitsandbytes_quantizes_on_cpu_within_one_step():
    """Where bitsandbytes imports its CPU kernel does the work, and its stated bound (one step, 2δ) is tight
    enough to be needed: it leaves the nearest code for some values."""
    assert uses_bitsandbytes("cpu") and not uses_bitsandbytes("cpu", 1000)
    x = sample(200003, signed=False, seed=3)
    codes, absmax = quantize_blockwise(x, signed=False)
    exact, _ = _quantize_torch(x, 256, signed=False)
    assert (codes != exact).any() and (codes.int() - exact.int()).abs().max() <= 8
    assert error_bound(False, "cpu") == 2 * max_error(False)


def test_shape_dtype_and_zeros():
    x = torch.randn(3, 50, 7, dtype=torch.bfloat16)
    codes, absmax = quantize_blockwise(x, 64)
    out = dequantize_blockwise(codes, absmax, x.shape, 64, torch.bfloat16)
    assert out.shape == x.shape and out.dtype == torch.bfloat16
    zeros = torch.zeros(300)
    for signed in (True, False):
        codes, absmax = quantize_blockwise(zeros, signed=signed)
        assert torch.equal(dequantize_blockwise(codes, absmax, zeros.shape, signed=signed), zeros)
        direct_codes, direct_absmax = zeros_blockwise((3, 100), signed=signed)
        assert direct_codes.shape == (3, 100) and direct_codes.dtype == torch.uint8 and torch.equal(direct_absmax, absmax)
        assert torch.equal(dequantize_blockwise(direct_codes, direct_absmax, (3, 100), signed=signed), zeros.view(3, 100))
        assert torch.equal(direct_codes.view(-1), _quantize_torch(zeros, 256, signed=signed)[0])  # the nearest code of 0


@needs_bnb
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("block_size", [64, 256, 4096])
def test_torch_path_agrees_with_bitsandbytes(signed, block_size):
    # bitsandbytes' CPU kernel is not exact round-to-nearest (it sends some tiny values a few codes
    # away), so: same absmax, codes equal or dequantized within one step of the map (2δ), and the
    # torch path (exact nearest code) never farther from x than bitsandbytes.
    x = sample(20011, signed, seed=block_size)
    code = dynamic_map(signed)
    codes, absmax = _quantize_torch(x, block_size, signed=signed)
    bnb_codes, bnb_state = bnb.quantize_blockwise(x, code=code, blocksize=block_size)
    assert torch.equal(absmax, bnb_state.absmax)
    ours = _dequantize_torch(codes, absmax, x.shape, block_size, torch.float32, signed=signed)
    theirs = bnb.dequantize_blockwise(bnb_codes, absmax=absmax, code=code, blocksize=block_size)
    scale = per_value_absmax(absmax, block_size, x.numel())
    assert torch.all((ours - theirs).abs() <= scale * 2 * (max_error(signed) + 1e-6))
    assert torch.all((x - ours).abs() <= (x - theirs).abs() + scale * 1e-7)
    # the formats are the same: bitsandbytes decodes our codes to our values
    decoded = bnb.dequantize_blockwise(codes, absmax=absmax, code=code, blocksize=block_size)
    torch.testing.assert_close(decoded, ours, rtol=1e-6, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("signed", [True, False])
def test_cuda_path_round_trip(signed):
    x = sample(10007, signed).cuda()
    codes, absmax = quantize_blockwise(x, signed=signed)
    error = (x - dequantize_blockwise(codes, absmax, x.shape, signed=signed)).abs()
    assert torch.all(error <= per_value_absmax(absmax, 256, x.numel()) * (max_error(signed) + 1e-6))

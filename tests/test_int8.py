"""INT8 weights (optim.int8) and their format (optim.quantize.quantize_int8, optim.rounding.stochastic_round_)."""
import pytest
import torch

from curvtrain.models.hf import export_hf
from curvtrain.models.llama import LlamaForCausalLM, llama_config
from curvtrain.optim.gradnorm_lorp import LLAMA_TARGETS
from curvtrain.optim.int8 import CODES, SCALE, Int8Weight, dequantized_state_dict, quantize_weights_
from curvtrain.optim.quantize import dequantize_int8, quantize_int8
from curvtrain.optim.rounding import stochastic_round_, write_weight_


def scales_per_value(scale, block_size, shape):
    return scale.repeat_interleave(block_size)[:shape.numel()].view(shape)


@pytest.mark.parametrize("shape,block_size", [((300, 70), 256), ((5, 13), 64), ((1, 1), 256)])
def test_int8_round_trip_within_half_a_step_and_idempotent(shape, block_size):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 3
    codes, scale = quantize_int8(x, block_size)
    assert codes.dtype == torch.int8 and codes.shape == x.shape and scale.shape == (-(-x.numel() // block_size),)
    assert codes.abs().max() == 127
    step = scales_per_value(scale, block_size, x.shape)
    assert torch.all((x - dequantize_int8(codes, scale, block_size)).abs() <= step * (0.5 + 1e-5))
    again = quantize_int8(dequantize_int8(codes, scale, block_size), block_size)
    assert torch.equal(again[0], codes) and torch.equal(again[1], scale)  # what float32 transport relies on


def test_stochastic_rounding_is_unbiased():
    """floor(x + u) is ⌊x⌋ or ⌈x⌉, and its mean over n draws is x within 5 standard errors (≤ 0.5/√n)."""
    x = torch.tensor([0.1, 2.5, -1.3, 7.0, -0.999])
    n = 20000
    draws = stochastic_round_(x.repeat(n, 1), torch.Generator().manual_seed(0))
    assert torch.all((draws == x.floor()) | (draws == x.ceil()))
    assert torch.allclose(draws.mean(0), x, atol=5 * 0.5 / n**0.5)


def test_stochastic_int8_mean_is_the_value_round_to_nearest_is_not():
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))
    gen, n = torch.Generator().manual_seed(2), 2000
    mean = sum(dequantize_int8(*quantize_int8(x, stochastic=True, generator=gen)) for _ in range(n)) / n
    step = scales_per_value(quantize_int8(x)[1], 256, x.shape)
    nearest_error = (dequantize_int8(*quantize_int8(x)) - x).abs()
    assert torch.all((mean - x).abs() <= 5 * 0.5 * step / n**0.5)
    assert (mean - x).abs().mean() < 0.1 * nearest_error.mean()


def test_update_written_through_int8_moves_the_weight_by_the_update_in_expectation():
    """An update of a tenth of a grid step (none on the values that set the scales): round to nearest drops
    it every time; `write_` (stochastic rounding) moves the weight by it on average over many writes."""
    w0 = torch.randn(32, 64, generator=torch.Generator().manual_seed(3))
    start = Int8Weight.from_float(w0)
    base = start.dequantize()
    step = scales_per_value(start.scale, 256, w0.shape)
    update = 0.1 * step * torch.sign(torch.randn(w0.shape, generator=torch.Generator().manual_seed(4)))
    update[base.abs() >= 127 * step * (1 - 1e-6)] = 0  # each block's absmax stays: the grid stays
    n, moved = 2000, torch.zeros_like(base)
    for i in range(n):
        w = Int8Weight(start.codes.clone(), start.scale.clone(), torch.float32)
        write_weight_(w, base + update, torch.Generator().manual_seed(100 + i))
        moved += w.dequantize() - base
    assert torch.allclose(moved / n, update, atol=5 * 0.5 * step.max().item() / n**0.5)
    nearest = Int8Weight(start.codes.clone(), start.scale.clone(), torch.float32)
    nearest.copy_(base + update)
    assert torch.equal(nearest.dequantize(), base)


def int8_and_dense(dtype=torch.float32):
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config("tiny")).to(dtype)
    names = quantize_weights_(model, LLAMA_TARGETS)
    dense = LlamaForCausalLM(llama_config("tiny")).to(dtype)
    dense.load_state_dict(dequantized_state_dict(model.state_dict(), dtype=dtype))
    return model, dense, names


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_model_forward_and_gradients_equal_the_dequantized_models(dtype):
    model, dense, names = int8_and_dense(dtype)
    assert len(names) == 14 and all(isinstance(p, Int8Weight) for n, p in model.named_parameters() if n in names)
    ids = torch.randint(0, 32000, (2, 17), generator=torch.Generator().manual_seed(5))
    assert torch.equal(model(ids), dense(ids))
    for m in (model, dense):
        m.gradient_checkpointing = True
        m.train()(ids[:, :-1], ids[:, 1:]).backward()
    grads = dict(dense.named_parameters())
    for name, p in model.named_parameters():
        assert type(p.grad) is torch.Tensor and p.grad.dtype == dtype
        assert torch.equal(p.grad, grads[name].grad), name


def test_state_dict_stores_codes_and_scales_and_loads_exactly():
    model, _, names = int8_and_dense()
    state = model.state_dict()
    name = names[0]
    assert name not in state and state[name + CODES].dtype == torch.int8 and state[name + SCALE].dtype == torch.float32
    torch.manual_seed(1)
    other = LlamaForCausalLM(llama_config("tiny"))
    quantize_weights_(other, LLAMA_TARGETS)
    other.load_state_dict(state)
    for (n, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), n


def test_writes_other_than_write_and_copy_are_refused():
    model, _, names = int8_and_dense()
    w = model.get_parameter(names[0])
    with pytest.raises(NotImplementedError, match="in-place ops and views"):
        w.data.mul_(2)
    with pytest.raises(NotImplementedError, match="in-place ops and views"):
        w.view(-1)
    assert torch.equal(w.float(), w.dequantize())  # reads are the dequantized matrix


def test_quantize_weights_refuses_a_rule_matching_nothing():
    with pytest.raises(ValueError, match="matches no parameter"):
        quantize_weights_(LlamaForCausalLM(llama_config("tiny")), r"nothing\.here$")


def test_export_loads_in_transformers_with_the_int8_models_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    from curvtrain.models.data.tokenizer import Tokenizer

    model, _, _ = int8_and_dense()
    out = export_hf(dequantized_state_dict(model.state_dict()), model.config, tmp_path / "hf",
                    tokenizer=Tokenizer.load("mistral-v1"))
    hf = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    ids = torch.randint(0, 32000, (2, 33), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (hf(ids).logits - model.eval()(ids)).abs().max().item() < 1e-4

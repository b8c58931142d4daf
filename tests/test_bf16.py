"""bf16 weights without an fp32 master copy: float32 optimizer state, and updates written with stochastic
rounding so that small updates accumulate as in float32 (optim.rounding, optim.adamw)."""
import pytest
import torch
from torch import nn

from curvtrain.optim.adamw import AdamW
from curvtrain.optim.gradnorm_lorp import GradNormLoRP
from curvtrain.optim.rounding import write_weight_


def test_stochastic_rounding_is_unbiased():
    """Between two bf16 neighbours lo < x < hi, rounding gives lo or hi only, and its mean over many
    draws converges to x (error of the mean ≤ 4 standard errors, σ ≤ (hi − lo)/2)."""
    torch.manual_seed(0)
    lo = torch.tensor(1.0, dtype=torch.bfloat16)
    hi = torch.nextafter(lo, torch.tensor(2.0, dtype=torch.bfloat16))
    n = 100_000
    for fraction in (0.1, 0.5, 0.93):
        x = (lo.float() + fraction * (hi.float() - lo.float())).item()
        p = torch.empty(n, dtype=torch.bfloat16)
        write_weight_(p, torch.full((n,), x))
        assert set(p.float().unique().tolist()) <= {lo.item(), hi.item()}
        ulp = (hi - lo).float().item()
        assert abs(p.double().mean().item() - x) <= 4 * (ulp / 2) / n**0.5
    for x in (-3.3e-3, 7.77e5):  # negative and large values: the magnitude is rounded, still unbiased
        p = torch.empty(n, dtype=torch.bfloat16)
        write_weight_(p, torch.full((n,), x))
        ulp = abs(torch.nextafter(torch.tensor(x).bfloat16(), torch.tensor(0.0).bfloat16()).item() - x) * 2
        assert abs(p.double().mean().item() - x) <= 4 * ulp / n**0.5


def run(make_opt, w0: torch.Tensor, dtype: torch.dtype, steps: int) -> torch.Tensor:
    """`steps` optimizer steps of a parameter starting at w0 (cast to dtype) on fixed random gradients."""
    torch.manual_seed(1)
    p = nn.Parameter(w0.to(dtype, copy=True))
    opt = make_opt(p)
    gen = torch.Generator().manual_seed(2)
    for _ in range(steps):
        p.grad = torch.randn(p.shape, generator=gen).add_(0.5).to(dtype)
        opt.step()
    return p.detach().float()


@pytest.mark.parametrize("make_opt", [
    lambda p: AdamW([p], lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1),
    lambda p: AdamW([p], lr=1e-4, betas=(0.9, 0.95), eight_bit=True),
    lambda p: GradNormLoRP([{"params": [p], "rank": 8, "update_gap": 50}], lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1),
], ids=["adamw", "adamw_8bit", "gradnorm_lorp"])
def test_small_updates_do_not_vanish_in_bf16_weights(make_opt):
    """Each step moves a weight by ≈ lr = 1e-4, far below half a bf16 ulp of weights ≈ 1 (2⁻⁸ ≈ 4e-3):
    round-to-nearest keeps the weights where they are. With stochastic rounding each bf16 weight is the
    float32 run's plus zero-mean noise, so along the float32 run's displacement D = w_fp32 − w₀ the
    bf16 run moves as far: ⟨w_bf16 − w₀, D⟩ / ‖D‖² = 1 ± 0.1 (the noise, ~ulp·√(p·steps) per weight,
    averages out over the 6144 weights)."""
    w0 = torch.randn(64, 96, generator=torch.Generator().manual_seed(0)).add_(1.0)
    w0 = w0.bfloat16().float()  # start both runs at the same, bf16-representable weights
    steps = 300
    ref = run(make_opt, w0, torch.float32, steps)
    low = run(make_opt, w0, torch.bfloat16, steps)
    d = ref - w0
    assert d.abs().mean() > 1e-3  # the updates add up to a fraction of a bf16 ulp per weight
    assert torch.dot((low - w0).flatten(), d.flatten()) / d.square().sum() == pytest.approx(1.0, abs=0.1)


def test_state_is_float32_for_bf16_weights():
    embed, proj, norm = (nn.Parameter(torch.randn(*shape, dtype=torch.bfloat16)) for shape in ((512, 16), (96, 64), (16,)))
    for eight_bit in (False, True):
        opt = GradNormLoRP([{"params": [proj], "rank": 8}, {"params": [embed, norm]}], lr=1e-3, eight_bit=eight_bit)
        for p in (embed, proj, norm):
            p.grad = torch.randn_like(p)
        opt.step()
        for p in (embed, proj, norm):
            for key, value in opt.state[p].items():
                if key == "step":
                    assert value.dtype == torch.int64
                elif key.endswith("_codes"):
                    assert value.dtype == torch.uint8
                elif key == "basis":
                    assert value.dtype == torch.bfloat16  # the projection basis, stored as GaLore does
                else:
                    assert value.dtype == torch.float32, (key, eight_bit)
        assert all(p.dtype == torch.bfloat16 for p in (embed, proj, norm))

import copy
import io

import pytest
import torch
from torch import nn

import curvtrain.optim.adamw as adamw_module
import curvtrain.optim.gradnorm_lorp as gnl
from curvtrain.optim.gradnorm_lorp import GradNormLoRP, lowrank_param_groups, weight_norm_grads
from curvtrain.optim.per_layer import attach_per_layer_step
from curvtrain.optim.quantize import max_error

BETAS, EPS = (0.9, 0.999), 1e-8


def regression_batches(shape, steps, dtype=torch.float64, seed=0):
    """Per-step (X, Y) for the loss ½‖X Wᵀ − Y‖² / batch, a different batch each step."""
    gen = torch.Generator().manual_seed(seed)
    m, n = shape
    return [
        (torch.randn(16, n, generator=gen, dtype=dtype), torch.randn(16, m, generator=gen, dtype=dtype))
        for _ in range(steps)
    ]


def loss_fn(w, batch):
    x, y = batch
    return 0.5 * (x @ w.T - y).square().sum() / len(x) + 0.1 * w.pow(4).sum()


def init_weight(shape, dtype=torch.float64, seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype) / shape[1] ** 0.5


def run_optimizer(w0, batches, *, lr=1e-2, weight_decay=0.0, eight_bit=False, **lowrank):
    """Steps GradNormLoRP on one weight; returns the weights after each step and the basis each step used."""
    w = nn.Parameter(w0.clone())
    opt = GradNormLoRP([{"params": [w], **lowrank}], lr=lr, weight_decay=weight_decay, eight_bit=eight_bit)
    weights, bases = [], []
    for batch in batches:
        opt.zero_grad()
        loss_fn(w, batch).backward()
        opt.step()
        weights.append(w.detach().clone())
        bases.append(opt.state[w]["basis"].clone())
    return weights, bases


def test_weight_norm_grads_match_autograd():
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(7, generator=gen, dtype=torch.float64).requires_grad_()  # signs of g may be negative
    v = torch.randn(7, 5, generator=gen, dtype=torch.float64).requires_grad_()
    w = g[:, None] * v / v.norm(dim=1, keepdim=True)
    w.retain_grad()
    loss_fn(w, regression_batches((7, 5), 1)[0]).backward()
    grad_g, grad_v = weight_norm_grads(w.detach(), w.grad, g.detach(), v.detach().norm(dim=1))
    torch.testing.assert_close(grad_g, g.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_v, v.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(12, 8), (8, 12)])  # right and left side
@pytest.mark.parametrize("steps", [1, 3])
def test_steps_equal_float64_reference(shape, steps):
    """Reference written from the equations with explicit (g, V) and the same bases."""
    lr, wd, scale, rank = 1e-2, 0.1, 0.25, 3
    w0, batches = init_weight(shape), regression_batches(shape, steps)
    weights, bases = run_optimizer(w0, batches, rank=rank, update_gap=2, scale=scale, lr=lr, weight_decay=wd)

    left = shape[0] < shape[1]
    g, v = w0.norm(dim=1), w0.clone()
    m = torch.zeros((rank, shape[1]) if left else (shape[0], rank), dtype=torch.float64)
    s2, mg, sg = torch.zeros_like(m), torch.zeros_like(g), torch.zeros_like(g)
    for t, (batch, basis, expected) in enumerate(zip(batches, bases, weights), start=1):
        g.requires_grad_(), v.requires_grad_()
        dg, dv = torch.autograd.grad(loss_fn(g[:, None] * v / v.norm(dim=1, keepdim=True), batch), (g, v))
        g, v = g.detach(), v.detach()
        r = basis.T @ dv if left else dv @ basis.T
        m, s2 = BETAS[0] * m + (1 - BETAS[0]) * r, BETAS[1] * s2 + (1 - BETAS[1]) * r**2
        n = (m / (1 - BETAS[0] ** t)) / ((s2 / (1 - BETAS[1] ** t)).sqrt() + EPS)
        mg, sg = BETAS[0] * mg + (1 - BETAS[0]) * dg, BETAS[1] * sg + (1 - BETAS[1]) * dg**2
        ng = (mg / (1 - BETAS[0] ** t)) / ((sg / (1 - BETAS[1] ** t)).sqrt() + EPS)
        g = g * (1 - lr * wd) - lr * ng
        v = v - lr * scale * (basis @ n if left else n @ basis)
        torch.testing.assert_close(expected, g[:, None] * v / v.norm(dim=1, keepdim=True), rtol=1e-10, atol=1e-12)


def test_full_rank_identity_basis_equals_adam_on_g_and_v(monkeypatch):
    """rank = n with an identity basis (patched in: the public API forbids rank ≥ min(m, n)), scale 1."""
    shape, lr = (10, 6), 1e-2
    monkeypatch.setattr(gnl, "refresh_basis", lambda grad, rank, side, **_: torch.eye(shape[1], dtype=grad.dtype))
    w0, batches = init_weight(shape), regression_batches(shape, 3)
    w = nn.Parameter(w0.clone())
    opt = GradNormLoRP([{"params": [w], "rank": shape[1] - 1, "update_gap": 1, "scale": 1.0}], lr=lr)
    opt.param_groups[0]["rank"] = shape[1]

    g, v = nn.Parameter(w0.norm(dim=1)), nn.Parameter(w0.clone())
    adam = torch.optim.Adam([g, v], lr=lr, betas=BETAS, eps=EPS)
    for batch in batches:
        opt.zero_grad(), adam.zero_grad()
        loss_fn(w, batch).backward()
        loss_fn(g[:, None] * v / v.norm(dim=1, keepdim=True), batch).backward()
        opt.step(), adam.step()
        expected = (g[:, None] * v / v.norm(dim=1, keepdim=True)).detach()
        torch.testing.assert_close(w.detach(), expected, rtol=1e-10, atol=1e-12)


def test_eight_bit_stays_close_to_32_bit():
    """Each requantization moves m by ≤ δs·absmax and v by ≤ δu·absmax (δ from the quantize bound);
    N = m̂/√v̂ then moves relatively by ≲ δs·absmax/|m| + ½δu·absmax/v. Blocks of Gaussian-like
    entries have absmax ≈ 3× their rms, and the error carried in the moving averages at most doubles
    that over 10 steps: rel. tol = 2·3·(δs + δu/2) ≈ 5.3% on each step's update and on W₁₀ − W₀."""
    tol = 6 * (max_error(True) + max_error(False) / 2)
    shape = (64, 48)
    w0, batches = init_weight(shape, torch.float32), regression_batches(shape, 10, torch.float32)
    options = dict(rank=8, update_gap=4, scale=1.0)
    full, _ = run_optimizer(w0, batches, **options)
    eight, _ = run_optimizer(w0, batches, **options, eight_bit=True)
    for before32, after32, before8, after8 in zip([w0] + full, full, [w0] + eight, eight):
        assert (after8 - before8 - (after32 - before32)).norm() <= tol * (after32 - before32).norm()
    assert (eight[-1] - full[-1]).norm() <= tol * (full[-1] - w0).norm()


def test_plain_group_is_adamw():
    w0 = init_weight((5, 4), torch.float32)
    a, b = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    ours = GradNormLoRP([a], lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW([b], lr=1e-2, weight_decay=0.1)
    for batch in regression_batches((5, 4), 3, torch.float32):
        for p, opt in ((a, ours), (b, ref)):
            opt.zero_grad()
            loss_fn(p, batch).backward()
            opt.step()
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_validation_errors():
    w, bias = nn.Parameter(torch.randn(6, 4)), nn.Parameter(torch.randn(4))

    def build(params=(w,), **options):
        return GradNormLoRP([{"params": list(params), "rank": 2, **options}])

    with pytest.raises(ValueError, match=r"rank 4 must be < min\(m, n\) = 4 for parameter of shape \(6, 4\)"):
        build(rank=4)
    with pytest.raises(ValueError, match="update_gap must be a positive int"):
        build(update_gap=0)
    with pytest.raises(ValueError, match="scale must be > 0"):
        build(scale=0.0)
    with pytest.raises(ValueError, match="needs 2-D parameters"):
        build(params=(bias,))
    with pytest.raises(ValueError, match="side must be 'auto', 'left' or 'right', got 'up'"):
        build(proj_side="up")
    with pytest.raises(ValueError, match="proj_method must be one of"):
        build(proj_method="qr")
    zero_row = nn.Parameter(torch.randn(6, 4).index_fill_(0, torch.tensor([2]), 0.0))
    opt = build(params=(zero_row,))
    zero_row.grad = torch.randn(6, 4)
    with pytest.raises(ValueError, match="zero row"):
        opt.step()


def test_lowrank_param_groups():
    model = nn.ModuleDict({"self_attn": nn.ModuleDict({"q_proj": nn.Linear(8, 8)}), "norm": nn.LayerNorm(8)})
    groups = lowrank_param_groups(
        model.named_parameters(), targets=gnl.LLAMA_TARGETS, rank=2, update_gap=10, scale=0.25
    )
    assert groups[0]["params"] == [model["self_attn"]["q_proj"].weight] and groups[0]["rank"] == 2
    assert len(groups[1]["params"]) == 3 and "rank" not in groups[1]
    GradNormLoRP(groups)
    with pytest.raises(ValueError, match="rule 'mlp' matches no trainable parameter"):
        lowrank_param_groups(model.named_parameters(), targets="mlp", rank=2, update_gap=10, scale=0.25)
    with pytest.raises(ValueError, match="'norm.weight' matched by 'norm' is not 2-D"):
        lowrank_param_groups(model.named_parameters(), targets="norm", rank=2, update_gap=10, scale=0.25)


def make_model(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 3)).to(dtype)


def make_gradnorm_lorp(model, eight_bit=False):
    groups = lowrank_param_groups(model.named_parameters(), targets=r"^[02]\.weight$", rank=3, update_gap=3, scale=0.5)
    return GradNormLoRP(groups, lr=1e-2, weight_decay=0.01, eight_bit=eight_bit)


def model_batches(steps, dtype=torch.float32):
    gen = torch.Generator().manual_seed(5)
    return [
        (torch.randn(8, 6, generator=gen).to(dtype), torch.randn(8, 3, generator=gen).to(dtype))
        for _ in range(steps)
    ]


def train(model, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        (model(x) - y).square().mean().backward()
        opt.step()


@pytest.mark.parametrize("eight_bit", [False, True])
def test_state_dict_resume_is_exact(eight_bit):
    batches = model_batches(10)
    straight = make_model()
    train(straight, make_gradnorm_lorp(straight, eight_bit), batches)

    first = make_model()
    opt = make_gradnorm_lorp(first, eight_bit)
    train(first, opt, batches[:5])
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed = make_model()
    resumed.load_state_dict(saved["model"])
    opt = make_gradnorm_lorp(resumed, eight_bit)
    opt.load_state_dict(saved["opt"])
    train(resumed, opt, batches[5:])
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_state_keeps_its_dtypes_through_load_for_bf16_weights():
    model = make_model(torch.bfloat16)
    opt = make_gradnorm_lorp(model, eight_bit=True)
    train(model, opt, model_batches(2, torch.bfloat16))
    fresh = make_gradnorm_lorp(model, eight_bit=True)
    fresh.load_state_dict(copy.deepcopy(opt.state_dict()))
    state = fresh.state[model[0].weight]
    assert state["g"].dtype == torch.float32 and state["basis"].dtype == torch.bfloat16  # GaLore keeps it in bf16
    assert state["exp_avg_codes"].dtype == torch.uint8
    assert state["step"].dtype == torch.int64 and state["step"].item() == 2


def per_layer_run(make_opt, batches, accumulation_steps=1):
    """Trains with per-layer stepping; returns the model and the peak number of live gradients."""
    model = make_model()
    params = list(model.parameters())
    opt = make_opt(model)
    peak = [0]

    def count_live_grads(_):  # registered first, so it runs before the step frees the gradient
        peak[0] = max(peak[0], sum(p.grad is not None for p in params))

    for p in params:
        p.register_post_accumulate_grad_hook(count_live_grads)
    handle = attach_per_layer_step(model, opt, accumulation_steps=accumulation_steps)
    for i in range(0, len(batches), accumulation_steps):
        for x, y in batches[i : i + accumulation_steps]:
            (model(x) - y).square().mean().backward()
        assert all(p.grad is None for p in params)
    handle.remove()
    return model, peak[0]


def adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)


@pytest.mark.parametrize("make_opt", [adamw, make_gradnorm_lorp], ids=["adamw", "gradnorm_lorp"])
@pytest.mark.parametrize("accumulation_steps", [1, 2])
def test_per_layer_step_equals_ordinary_loop(make_opt, accumulation_steps):
    batches = model_batches(8)
    ordinary = make_model()
    opt = make_opt(ordinary)
    for i in range(0, len(batches), accumulation_steps):
        opt.zero_grad()
        for x, y in batches[i : i + accumulation_steps]:
            (ordinary(x) - y).square().mean().backward()
        opt.step()

    per_layer, peak = per_layer_run(make_opt, batches, accumulation_steps)
    for a, b in zip(ordinary.parameters(), per_layer.parameters()):
        assert torch.equal(a, b)
    if accumulation_steps == 1:  # with accumulation the kept gradients coexist between micro-batches
        assert peak == 1 < len(list(per_layer.parameters()))


def test_handle_remove_detaches_hooks():
    model = make_model()
    handle = attach_per_layer_step(model, adamw(model))
    handle.remove()
    x, y = model_batches(1)[0]
    (model(x) - y).square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_trains_a_small_mlp():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 16, generator=gen)
    y = torch.tanh(x @ torch.randn(16, 4, generator=gen)) @ torch.randn(4, 1, generator=gen)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 1))
    groups = lowrank_param_groups(model.named_parameters(), targets=r"^0\.weight$", rank=4, update_gap=20, scale=1.0)
    opt = GradNormLoRP(groups, lr=1e-2)
    losses = []
    for _ in range(100):
        opt.zero_grad()
        loss = (model(x) - y).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]


def test_eight_bit_covers_every_large_moment_and_spares_small_ones():
    """bitsandbytes-style: the low-rank moments and the plain groups' moments of tensors with
    ≥ MIN_8BIT_NUMEL elements are 8-bit; small plain tensors (norm gains) and g stay full precision."""
    from curvtrain.optim.adamw import MIN_8BIT_NUMEL

    embed, proj, norm = (nn.Parameter(torch.randn(*shape)) for shape in ((512, 16), (96, 64), (16,)))
    groups = [{"params": [proj], "rank": 8}, {"params": [embed, norm]}]
    opt = GradNormLoRP(groups, lr=1e-3, eight_bit=True)
    for p in (embed, proj, norm):
        p.grad = torch.randn_like(p)
    opt.step()
    assert embed.numel() >= MIN_8BIT_NUMEL > norm.numel()
    assert opt.state[embed]["exp_avg_codes"].dtype == torch.uint8 and "exp_avg" not in opt.state[embed]
    assert opt.state[proj]["exp_avg_sq_codes"].dtype == torch.uint8
    assert opt.state[norm]["exp_avg"].dtype == torch.float32 and opt.state[proj]["g_exp_avg"].dtype == torch.float32


def test_eight_bit_plain_group_stays_close_to_adamw():
    """The 8-bit plain-group update stays within the quantization tolerance of AdamW's (as for the
    low-rank moments, test_eight_bit_stays_close_to_32_bit)."""
    tol = 6 * (max_error(True) + max_error(False) / 2)
    w0 = torch.randn(128, 64, generator=torch.Generator().manual_seed(0))
    a, b = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    eight, full = GradNormLoRP([a], lr=1e-2, eight_bit=True), GradNormLoRP([b], lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    for _ in range(10):
        grad = torch.randn(128, 64, generator=gen)
        a.grad, b.grad = grad.clone(), grad.clone()
        eight.step(), full.step()
    assert (a - b).norm() <= tol * (b - w0).norm()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eight_bit_moments_chunked_equal_whole(monkeypatch, dtype):
    """Updating 8-bit moments CHUNK values at a time (bounded temporaries) changes no bit of weights or state:
    chunks hold whole quantization blocks. Shapes leave a partial last block and a partial last chunk."""
    def run(chunk):
        monkeypatch.setattr(adamw_module, "CHUNK", chunk)
        gen = torch.Generator().manual_seed(0)
        torch.manual_seed(0)  # the stochastic rounding of bf16 weights draws from the global generator
        embed, proj = (nn.Parameter(torch.randn(*shape, generator=gen).to(dtype)) for shape in ((500, 17), (200, 64)))
        opt = GradNormLoRP([{"params": [proj], "rank": 8}, {"params": [embed]}], lr=1e-2, eight_bit=True)
        for _ in range(3):
            for p in (embed, proj):
                p.grad = torch.randn(p.shape, generator=gen).to(dtype)
            opt.step()
        return [embed, proj], opt.state_dict()["state"]

    (params, state), (chunked_params, chunked_state) = run(1 << 20), run(512)
    for a, b in zip(params, chunked_params):
        assert torch.equal(a, b)
    for i in state:
        for key, value in state[i].items():
            assert torch.equal(value, chunked_state[i][key]), key

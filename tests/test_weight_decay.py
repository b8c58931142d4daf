"""One weight decay rule for every optimizer of the registry: matrices decay, norm gains do not."""
import pytest
import torch

from curvtrain.models.llama import LlamaForCausalLM, llama_config
from curvtrain.optim import OPTIMIZERS, OptimizerConfig, build_optimizer
from curvtrain.optim.state import CurvatureOptimizer

# With a zero gradient their step is the decay alone (decoupled, or L2 through plain SGD). AdaHessian needs
# a curvature estimate before it steps and M-FAC preconditions its L2 term: the group rule covers them.
PURE_DECAY_STEP = ("adamw", "sgd", "gradnorm_lorp", "galore_adamw", "sophia", "muon", "apollo", "apollo_mini")
# DeepSpeed builds deepspeed_muon itself, on distributed.engine's `decay_groups`: ours are the others.
OURS = sorted(n for n, entry in OPTIMIZERS.items() if entry.deepspeed is None)


def build(name: str):
    if name == "galore_adamw":
        pytest.importorskip("galore_torch")
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config("tiny"))
    cfg = OptimizerConfig(name=name, lr=0.1, weight_decay=0.5)
    cfg.lowrank.rank = cfg.apollo.rank = 8  # APOLLO's recipe, 256, is wider than the tiny model
    return model, build_optimizer(cfg, model.named_parameters())


@pytest.mark.parametrize("name", OURS)
def test_every_optimizer_decays_matrices_only(name):
    model, opt = build(name)
    decay = {p: group["weight_decay"] for group in opt.param_groups for p in group["params"]}
    assert set(decay) == set(model.parameters())
    for n, p in model.named_parameters():
        assert (decay[p] > 0) == (p.dim() >= 2), f"{name}: {n} has weight_decay {decay[p]}"
    assert any(p.dim() < 2 for p in model.parameters())  # the tiny model has norm gains


@pytest.mark.parametrize("name", PURE_DECAY_STEP)
def test_matrices_decay_and_norm_gains_do_not(name):
    """With zero gradients Adam's (and Sophia's) direction is 0, so one step is the decay alone:
    W ← (1 − lr·wd) W for matrices, unchanged for vectors (AdamW, Loshchilov & Hutter 2019)."""
    model, opt = build(name)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    if isinstance(opt, CurvatureOptimizer):  # Sophia: a zero curvature estimate
        opt.update_hessian({p: torch.zeros_like(p) for p in model.parameters()})
    opt.step()
    for n, p in model.named_parameters():
        factor = 1 - 0.1 * 0.5 if p.dim() >= 2 else 1.0
        torch.testing.assert_close(p.detach(), factor * before[n], msg=f"{name}: {n}")

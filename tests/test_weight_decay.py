"""One weight decay rule for every optimizer of the registry: matrices decay, norm gains do not."""
import pytest
import torch

from curvtrain.models.llama import LlamaForCausalLM, llama_config
from curvtrain.optim import OPTIMIZERS, OptimizerConfig, build_optimizer


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_matrices_decay_and_norm_gains_do_not(name):
    """With zero gradients Adam's direction is 0, so one step is the decoupled decay alone:
    W ← (1 − lr·wd) W for matrices, unchanged for vectors (AdamW, Loshchilov & Hutter 2019)."""
    if name == "galore_adamw":
        pytest.importorskip("galore_torch")
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config("tiny"))
    cfg = OptimizerConfig(name=name, lr=0.1, weight_decay=0.5)
    cfg.lowrank.rank = 8
    opt = build_optimizer(cfg, model.named_parameters())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        factor = 1 - 0.1 * 0.5 if p.dim() >= 2 else 1.0
        torch.testing.assert_close(p.detach(), factor * before[n], msg=f"{name}: {n}")
    assert any(p.dim() < 2 for p in model.parameters())  # the tiny model has norm gains

"""AdamW (Loshchilov & Hutter, ICLR 2019, "Decoupled Weight Decay Regularization") as the project uses it.

Weight decay rule, the one for every optimizer here: matrices (dim ≥ 2: projections, embeddings,
output head) are decayed, vectors (norm gains, biases) are not (nanoGPT's and GaLore's rule).
"""

from collections.abc import Iterable

from torch import Tensor
from torch.nn import Parameter


def decays(p: Tensor) -> bool:
    """Whether decoupled weight decay acts on p: matrices yes, vectors (norm gains, biases) no."""
    return p.dim() >= 2


def decay_groups(params: Iterable[Parameter], weight_decay: float, **options) -> list[dict]:
    """Param groups of the trainable `params` split by `decays`: the decayed ones with `weight_decay`,
    the others with 0; `options` go into both; an empty group is left out."""
    params = [p for p in params if p.requires_grad]
    groups = [
        {"params": [p for p in params if decays(p)], "weight_decay": weight_decay, **options},
        {"params": [p for p in params if not decays(p)], "weight_decay": 0.0, **options},
    ]
    return [g for g in groups if g["params"]]

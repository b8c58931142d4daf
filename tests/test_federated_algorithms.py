"""The federated algorithms' pieces against their equations (float64, one process, no Ray)."""
import pytest
import torch
from torch import nn

from curvtrain.distributed.federated.algorithms import Algorithm, FedProx, FedSpeed, Scaffold, load_flat, mean_of
from curvtrain.distributed.federated.client import ClientDiverged, train_client
from curvtrain.optim import OptimizerConfig, build_optimizer

D, C = 6, 3  # features, classes


def model_and_data(num_clients=4, per_client=5, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, C)).double()
    x = torch.randn(num_clients, per_client, D, dtype=torch.float64)
    y = torch.randint(0, C, (num_clients, per_client))
    return model, [(x[i], y[i]) for i in range(num_clients)]


def loss_fn(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def flat(model):
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()


def flat_params(model):
    return torch.cat([p.reshape(-1) for p in model.parameters()])


def sgd(model, lr=0.1):
    return build_optimizer(OptimizerConfig(name="sgd", lr=lr, weight_decay=0.0), model.named_parameters())


def zeros(names, d):
    return {k: torch.zeros(d, dtype=torch.float64) for k in names}


def run_round(algorithm, model, x, server_state, client_states, data, clients, *, steps, lr=0.1, num_clients=None):
    """One round over `clients`; client states are updated in place. Returns (x', server state', uploads)."""
    results = []
    for i in clients:
        batches = [data[i]] * steps
        res = train_client(model, algorithm, sgd(model), batches, loss_fn, start=x, server_state=server_state,
                           client_state=client_states[i], lr=lr, steps=steps)
        results.append(res)
        client_states[i] = res.state
    mean = mean_of([r.upload for r in results])
    x_new, state = algorithm.server_update(x, server_state, mean, len(clients) / (num_clients or len(data)))
    return x_new, state, [r.upload for r in results]


def test_fedavg_one_step_equals_centralized_sgd_on_the_union_batch():
    model, data = model_and_data()
    x0 = flat(model)
    fedavg = Algorithm()
    x1, _, _ = run_round(fedavg, model, x0, {}, [{}] * 4, data, range(4), steps=1, lr=0.1)

    load_flat(list(model.parameters()), x0)
    opt = sgd(model, 0.1)
    opt.zero_grad()
    loss_fn(model, (torch.cat([b[0] for b in data]), torch.cat([b[1] for b in data]))).backward()
    opt.step()
    torch.testing.assert_close(x1, flat(model), rtol=0, atol=1e-14)


def test_fedprox_mu0_is_fedavg_and_mu_adds_the_proximal_gradient():
    model, data = model_and_data()
    x0 = flat(model)
    avg, _, _ = run_round(Algorithm(), model, x0, {}, [{}] * 4, data, range(4), steps=3)
    prox0, _, _ = run_round(FedProx(mu=0.0), model, x0, {}, [{}] * 4, data, range(4), steps=3)
    assert torch.equal(avg, prox0)

    # μ > 0: each local step descends fᵢ(x) + (μ/2)‖x − xᵗ‖², the gradient checked against autograd
    mu, lr = 0.7, 0.1
    prox, _, _ = run_round(FedProx(mu=mu), model, x0, {}, [{}] * 4, data, range(4), steps=2, lr=lr)
    finals = []
    for batch in data:
        x = x0.clone()
        for _ in range(2):
            load_flat(list(model.parameters()), x)
            objective = loss_fn(model, batch) + mu / 2 * (flat_params(model) - x0).pow(2).sum()
            grads = torch.autograd.grad(objective, list(model.parameters()))
            x = x - lr * torch.cat([g.reshape(-1) for g in grads])
        finals.append(x)
    torch.testing.assert_close(prox, torch.stack(finals).mean(0), rtol=0, atol=1e-13)
    assert not torch.allclose(prox, avg)


def test_fedspeed_rho0_with_correction_held_at_zero_is_fedprox_mu_one_over_lambda():
    model, data = model_and_data()
    x0, d, lam = flat(model), flat(model).numel(), 4.0
    speed = FedSpeed(rho=0.0, lam=lam)
    xs, _, uploads = run_round(speed, model, x0, zeros(["g_bar"], d), [zeros(["g_hat"], d)] * 4, data, range(4), steps=3)
    xp, _, _ = run_round(FedProx(mu=1 / lam), model, x0, {}, [{}] * 4, data, range(4), steps=3)
    # the local trajectories are FedProx's; with ĝ held at zero (no dg) so is the server step
    mean = mean_of(uploads)
    held, _ = speed.server_update(x0, zeros(["g_bar"], d), {"delta": mean["delta"], "dg": torch.zeros(d, dtype=torch.float64)}, 1.0)
    torch.testing.assert_close(held, xp, rtol=0, atol=1e-15)
    assert not torch.allclose(xs, xp)  # the correction does change the server step


def test_fedspeed_perturbed_gradient_matches_autograd():
    model, data = model_and_data(num_clients=1)
    x0, d = flat(model), flat(model).numel()
    rho, lam, alpha, lr = 0.05, 2.0, 0.6, 0.1
    speed = FedSpeed(rho=rho, lam=lam, alpha=alpha)
    res = train_client(model, speed, sgd(model, lr), [data[0]], loss_fn, start=x0, server_state=zeros(["g_bar"], d),
                       client_state=zeros(["g_hat"], d), lr=lr, steps=1)

    def grad_at(x):
        load_flat(list(model.parameters()), x)
        grads = torch.autograd.grad(loss_fn(model, data[0]), list(model.parameters()))
        return torch.cat([g.reshape(-1) for g in grads])

    g1 = grad_at(x0)
    g2 = grad_at(x0 + rho * g1 / g1.norm())
    x1 = x0 - lr * ((1 - alpha) * g1 + alpha * g2)  # x = xᵗ at the first step: no proximal pull yet
    torch.testing.assert_close(res.upload["delta"], x1 - x0, rtol=0, atol=1e-14)
    torch.testing.assert_close(res.state["g_hat"], -(x1 - x0) / lam, rtol=0, atol=1e-14)


def test_scaffold_control_variates_obey_the_sums():
    model, data = model_and_data(num_clients=4)
    x, d, lr = flat(model), flat(model).numel(), 0.1
    alg = Scaffold()
    states = [zeros(["c"], d) for _ in range(4)]
    server = zeros(["c"], d)
    # K = 1 from cᵢ = c = 0: option II gives cᵢ⁺ = ∇fᵢ(xᵗ)
    x1, server, _ = run_round(alg, model, x, server, states, data, [1], steps=1, lr=lr)
    load_flat(list(model.parameters()), x)
    grads = torch.autograd.grad(loss_fn(model, data[1]), list(model.parameters()))
    torch.testing.assert_close(states[1]["c"], torch.cat([g.reshape(-1) for g in grads]), rtol=0, atol=1e-14)
    # over rounds of partial participation the server's c stays the mean of all N clients' cᵢ
    for clients in ([0, 2], [1, 3], [0, 1]):
        x, server, _ = run_round(alg, model, x, server, states, data, clients, steps=3, lr=lr)
        torch.testing.assert_close(server["c"], torch.stack([s["c"] for s in states]).mean(0), rtol=0, atol=1e-14)
    # and with plain SGD, cᵢ⁺ = mean over the K steps of ∇fᵢ at the local iterates: xᵗ − x_K = Kη(mean g − cᵢ + c)
    before, c = states[2]["c"].clone(), server["c"].clone()
    res = train_client(model, alg, sgd(model, lr), [data[2]] * 3, loss_fn, start=x, server_state=server,
                       client_state=states[2], lr=lr, steps=3)
    torch.testing.assert_close(res.state["c"], before - c - res.upload["delta"] / (3 * lr), rtol=0, atol=1e-14)
    assert torch.equal(res.upload["dc"], res.state["c"] - before)


def test_a_diverging_client_raises():
    model, data = model_and_data(num_clients=1)
    x, y = data[0]
    bad = (x.clone().fill_(float("nan")), y)
    with pytest.raises(ClientDiverged):
        train_client(model, Algorithm(), sgd(model), [bad], loss_fn, start=flat(model), server_state={},
                     client_state={}, lr=0.1, steps=1)

"""fastcurv.curvature.GGN: products against a dense float64 J^T H_loss J (torch.func.jacrev / hessian) and
against curvlinops' GGNLinearOperator; the solvers on it against eigh of the dense matrix."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian, jacrev

from fastcurv.curvature import GGN, Hessian, frobenius_sq, top_eigenvalues, trace

DT = torch.float64


def tanh_mlp(classes=3):
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, classes)).to(DT)


def small_cnn():
    """Conv -> eval BatchNorm (non-trivial running statistics) -> tanh -> conv -> linear."""
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Tanh(), nn.Conv2d(3, 2, 3, stride=2),
                          nn.Tanh(), nn.Flatten(), nn.Linear(8, 3)).to(DT)
    model[1].running_mean.uniform_(-0.5, 0.5)
    model[1].running_var.uniform_(0.5, 2.0)
    return model.eval()


def batches_for(model, sizes, classes=3, regression=False):
    shape = (4,) if isinstance(model[0], nn.Linear) else (2, 6, 6)
    out = []
    for n in sizes:
        x = torch.randn(n, *shape, dtype=DT)
        y = torch.randn(n, classes, dtype=DT) if regression else torch.randint(0, classes, (n,))
        out.append((x, y))
    return out


def dense_ggn(model, loss_fn, batches, reduction="mean"):
    """``sum_b w_b J_b^T H_b J_b`` from the full Jacobian and the full output Hessian, float64; ``w_b = n_b / N``
    for a batch-mean loss, ``1 / N`` for a batch-sum loss."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names, params = [n for n, _ in named], [p for _, p in named]
    flat0 = torch.cat([p.detach().reshape(-1) for p in params])
    N = sum(len(x) for x, _ in batches)

    def output_of(flat, x):
        pieces, offset = {}, 0
        for name, p in zip(names, params):
            pieces[name] = flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        return functional_call(model, pieces, (x,))

    G = 0
    for x, y in batches:
        out = output_of(flat0, x).detach()
        J = jacrev(lambda f: output_of(f, x).reshape(-1))(flat0)  # [n C, P]
        H = hessian(lambda f: loss_fn(f.view(out.shape), y))(out.reshape(-1))  # [n C, n C]
        G = G + (len(x) if reduction == "mean" else 1) / N * J.T @ H @ J
    return G


LOSSES = {
    "F.cross_entropy": (F.cross_entropy, False),
    "CrossEntropyLoss(sum)": (nn.CrossEntropyLoss(reduction="sum"), False),
    "F.mse_loss": (F.mse_loss, True),
    "MSELoss(sum)": (nn.MSELoss(reduction="sum"), True),
    "cross_entropy label smoothing (autograd path)": (nn.CrossEntropyLoss(label_smoothing=0.1), False),
    "smooth_l1 (autograd path)": (F.smooth_l1_loss, True),
}


@pytest.mark.parametrize("loss_name", sorted(LOSSES))
@pytest.mark.parametrize("K", [1, 4])
def test_ggn_matches_dense_jacobian_form(loss_name, K):
    loss_fn, regression = LOSSES[loss_name]
    model = tanh_mlp()
    batches = batches_for(model, [5, 3], regression=regression)  # unequal batches: weights n_b / N
    reduction = "sum" if "sum" in loss_name else "mean"
    G = GGN(model, loss_fn, batches, loss_reduction=reduction)
    dense = dense_ggn(model, loss_fn, batches, reduction)
    V = torch.randn(G.num_params, K, dtype=DT)
    torch.testing.assert_close(G @ V, dense @ V, rtol=1e-10, atol=1e-12)


def test_ggn_on_a_cnn_with_eval_batchnorm_and_cached_graph_follows_parameter_changes():
    model = small_cnn()
    batches = batches_for(model, [6])
    G = GGN(model, F.cross_entropy, batches[0])
    V = torch.randn(G.num_params, 3, dtype=DT)
    torch.testing.assert_close(G @ V, dense_ggn(model, F.cross_entropy, batches) @ V, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        model[0].weight.mul_(1.5)  # the cached graph is stale now
    torch.testing.assert_close(G @ V, dense_ggn(model, F.cross_entropy, batches) @ V, rtol=1e-10, atol=1e-12)


def test_ggn_equals_hessian_for_a_linear_model_with_mse():
    """J does not depend on the parameters of a linear model, so the Hessian is its Gauss-Newton matrix."""
    model = nn.Linear(4, 3).to(DT)
    x, y = torch.randn(7, 4, dtype=DT), torch.randn(7, 3, dtype=DT)
    G, H = GGN(model, F.mse_loss, (x, y)), Hessian(model, F.mse_loss, (x, y))
    torch.testing.assert_close(G.to_dense(), H.to_dense(), rtol=1e-12, atol=1e-12)


def test_ggn_is_symmetric_positive_semidefinite_and_a_params_subset_is_its_block():
    model = tanh_mlp()
    batches = batches_for(model, [8])
    full = GGN(model, F.cross_entropy, batches).to_dense()
    torch.testing.assert_close(full, full.T, rtol=0, atol=1e-14)
    assert torch.linalg.eigvalsh(full).min() > -1e-12
    last = list(model[4].parameters())
    block = GGN(model, F.cross_entropy, batches, params=last).to_dense()
    count = sum(p.numel() for p in last)
    torch.testing.assert_close(block, full[-count:, -count:], rtol=1e-12, atol=1e-14)


def test_solvers_on_the_ggn_match_the_dense_matrix():
    model = tanh_mlp()
    batches = batches_for(model, [10, 6])
    G = GGN(model, F.cross_entropy, batches)
    dense = dense_ggn(model, F.cross_entropy, batches)
    eigenvalues = torch.linalg.eigvalsh(dense).flip(0)
    values, _ = top_eigenvalues(G, k=3, tol=1e-10)
    torch.testing.assert_close(values, eigenvalues[:3], rtol=1e-8, atol=1e-12)
    exact_trace = dense.trace().item()
    assert trace(G, num_probes=G.num_params, method="hutch++") == pytest.approx(exact_trace, rel=1e-10)
    estimate, stderr = trace(G, num_probes=200, return_stderr=True)
    assert abs(estimate - exact_trace) < 4 * stderr
    estimate, stderr = frobenius_sq(G, num_probes=200, return_stderr=True)
    assert abs(estimate - dense.square().sum().item()) < 4 * stderr


def _curvlinops():
    try:
        import curvlinops
    except ImportError as err:  # absent, or installed without its dependencies (linear_operator)
        pytest.skip(f"curvlinops not importable: {err}")
    return curvlinops


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_ggn_matches_curvlinops(loss):
    curvlinops = _curvlinops()
    model = tanh_mlp()
    loss_module = nn.CrossEntropyLoss() if loss == "cross_entropy" else nn.MSELoss()
    batches = batches_for(model, [6, 6], regression=loss == "mse")
    reference = curvlinops.GGNLinearOperator(model, loss_module, list(model.parameters()), batches)
    G = GGN(model, loss_module, batches)
    V = torch.randn(G.num_params, 5, dtype=DT)
    torch.testing.assert_close(G @ V, reference @ V, rtol=1e-10, atol=1e-12)


def test_ggn_bad_input():
    model = tanh_mlp()
    x, y = batches_for(model, [4])[0]
    with pytest.raises(ValueError, match="loss_reduction"):
        GGN(model, F.cross_entropy, (x, y), loss_reduction="none")
    with pytest.raises(ValueError, match="scalar loss"):
        GGN(model, lambda out, t: F.cross_entropy(out, t, reduction="none"), (x, y)) @ torch.randn(
            sum(p.numel() for p in model.parameters()), dtype=DT)
    model.train()
    with pytest.raises(RuntimeError, match="train mode"):
        GGN(nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5)).to(DT), F.cross_entropy, (x, y))

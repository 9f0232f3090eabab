"""What users run today instead of fastcurv's exact penalty: plain-PyTorch reference steps of SAM and
of the finite-difference gradient-norm penalty GNP (SCIENCE.md section 7, "What users run instead").

Each ``make_*_step(model)`` returns ``step(model, x, y)`` that leaves the update direction in ``.grad``
(the optimizer step itself is not part of it, as for the plain step it is compared with). Both take two
forward+backward passes and penalize the norm of the BATCH gradient, not the mean per-example norm.
"""
import torch
import torch.nn.functional as F

SAM_RHO = 0.05  # Foret et al. 2021's default radius
GNP_R, GNP_ALPHA = 0.05, 0.8  # Zhao et al. 2022: finite-difference radius r and mixing weight alpha


def _ascent(params, grads, radius):
    """Move ``params`` by ``radius * g / ||g||`` (in place); returns the offsets to undo it."""
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    offsets = [g * (radius / (norm + 1e-12)) for g in grads]
    with torch.no_grad():
        torch._foreach_add_(params, offsets)
    return offsets


def _loss_grads(model, params, x, y):
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    return [p.grad for p in params]


def make_sam_step(model, rho=SAM_RHO):
    """SAM: ``.grad = grad L(w + rho g / ||g||)`` with ``g = grad L(w)``."""
    params = [p for p in model.parameters() if p.requires_grad]

    def step(model, x, y):
        offsets = _ascent(params, _loss_grads(model, params, x, y), rho)
        _loss_grads(model, params, x, y)
        with torch.no_grad():
            torch._foreach_sub_(params, offsets)

    return step


def make_gnp_step(model, r=GNP_R, alpha=GNP_ALPHA):
    """GNP: ``.grad = (1 - alpha) grad L(w) + alpha grad L(w + r g / ||g||)``, the finite-difference
    gradient of ``L + (alpha r) ||grad L||`` (Zhao et al. 2022, eq. 9)."""
    params = [p for p in model.parameters() if p.requires_grad]

    def step(model, x, y):
        grads = _loss_grads(model, params, x, y)
        offsets = _ascent(params, grads, r)
        _loss_grads(model, params, x, y)
        with torch.no_grad():
            torch._foreach_sub_(params, offsets)
            for p, g in zip(params, grads):
                p.grad.mul_(alpha).add_(g, alpha=1 - alpha)

    return step

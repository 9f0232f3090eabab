"""What users run today instead of fastcurv's exact penalty: SAM, GNP and LookSAM (SCIENCE.md section 7,
"What users run instead"), as the learning rules of ``fastcurv.train`` (``sam``, ``gnp``, ``looksam``):
one implementation, tested against hand-written float64 references in ``tests/test_train_sam.py``.

Each ``make_*_step(model)`` returns ``step(model, x, y)`` that leaves the update direction in ``.grad``
(the optimizer step itself is not part of it, as for the plain step it is compared with). SAM and GNP take
two forward+backward passes and penalize the norm of the BATCH gradient, not the mean per-example norm;
LookSAM takes two on every k-th call and one in between.
"""
from fastcurv.train import DEFAULTS, make_rule, per_example_loss

SAM_RHO = DEFAULTS["sam"]["rho"]  # Foret et al. 2021's default radius
GNP_R, GNP_ALPHA = DEFAULTS["gnp"]["r"], DEFAULTS["gnp"]["alpha"]  # Zhao et al. 2022: radius r, mixing weight alpha


def _rule_step(rule, model, **hyper):
    bound = make_rule(rule, **hyper).bind(model, per_example_loss("cross_entropy"), epochs=1)

    def step(model, x, y):
        bound.gradient(x, y)

    return step


def make_sam_step(model, rho=SAM_RHO, adaptive=False):
    """SAM: ``.grad = grad L(w + rho g / ||g||)`` with ``g = grad L(w)`` (ASAM with ``adaptive=True``)."""
    return _rule_step("sam", model, rho=rho, adaptive=adaptive)


def make_gnp_step(model, r=GNP_R, alpha=GNP_ALPHA):
    """GNP: ``.grad = (1 - alpha) grad L(w) + alpha grad L(w + r g / ||g||)``, the finite-difference
    gradient of ``L + (alpha r) ||grad L||`` (Zhao et al. 2022, eq. 9)."""
    return _rule_step("gnp", model, r=r, alpha=alpha)


def make_looksam_step(model, **hyper):
    """LookSAM (Liu et al. 2022): SAM's gradient every k-th call, the stored orthogonal part reused between."""
    return _rule_step("looksam", model, **hyper)

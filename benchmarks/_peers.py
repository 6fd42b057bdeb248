"""The peer implementations of each benchmarked op, with the conversions to curvfx's conventions.

Every implementation returns something that ``flat`` turns into one vector in curvfx's order
(``model.named_parameters()``), already converted to curvfx's scaling, so that the runner can
report ``‖peer - curvfx‖ / ‖curvfx‖``. Conversions (all losses here use ``reduction="mean"``
over N samples):

* curvlinops: operators of the loss as written, same as curvfx; no conversion.
* BackPACK: ``BatchGrad`` gives ∇(ℓ_n / N), the per-sample terms of the batch loss → × N;
  ``DiagGGNExact`` / ``DiagGGNMC`` are of the loss as written (no change).
* Empirical Fisher: curvfx follows curvlinops, E = (1/Z) Σ_n ∇ℓ_n ∇ℓ_nᵀ with Z the mean's
  denominator (N for cross-entropy, N·C for ``MSELoss``, whose ℓ_n sums over the C
  entries). BackPACK's ``SumGradSquared`` is Σ_n (∇ℓ_n / Z)² → × Z. Plain torch's
  per-sample gradients g_n are of each sample's own loss (the mean over its C entries for
  MSE: g_n = ∇ℓ_n / C), so (1/N) Σ_n g_n² → × Z/N (1 for cross-entropy, C for MSE).
* torch-secorder: ``gauss_newton_matrix_approximation`` is diag(JᵀJ) without the loss Hessian:
  × 2/(N·C) for ``MSELoss`` (its documented use); for other losses it is reported as is.
  ``empirical_fisher_diagonal`` squares the batch gradient and ``gauss_newton_product``
  returns zeros (known defects): no conversion can fix them, and the agreement column shows it.
* PyHessian: Hessian of the loss as written (it averages over batches); its ``trace`` returns
  the list of the probes' vᵀHv, whose mean is the estimate.

Each peer gets its own deep copy of the model: BackPACK's ``extend`` adds hooks to it and
PyHessian switches it to eval mode and leaves ``.grad`` set.
"""

from __future__ import annotations

import copy
import importlib
import importlib.metadata

import torch
from torch import nn

PEERS = {  # display name: (import name, distribution)
    "curvlinops": ("curvlinops", "curvlinops-for-pytorch"),
    "BackPACK": ("backpack", "backpack-for-pytorch"),
    "torch-secorder": ("torch_secorder", "torch-secorder"),
    "PyHessian": ("pyhessian", "pyhessian"),
}


def peer_status() -> dict[str, str]:
    """Each peer's version, or "absent (reason)" if it does not import."""
    status = {}
    for name, (module, dist) in PEERS.items():
        try:
            importlib.import_module(module)
        except Exception as err:  # a broken peer is reported, not fatal
            status[name] = f"absent ({type(err).__name__}: {str(err).splitlines()[0][:80]})"
            continue
        try:
            status[name] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            status[name] = "installed (version unknown)"
    return status


def flat(result) -> torch.Tensor:
    """A result (tensor, float, dict / list / tuple of tensors) as one flat float tensor."""
    if isinstance(result, int | float):
        return torch.tensor([float(result)])
    if isinstance(result, torch.Tensor):
        return result.detach().reshape(-1)
    if isinstance(result, dict):
        result = list(result.values())
    return torch.cat([flat(r) for r in result])


def peer_ops(c, status: dict[str, str]) -> tuple[dict[str, dict], dict[str, str]]:
    """``{op: {library: {variant: callable}}}`` for plain torch and every importable peer.

    Also returns ``{library: reason}`` for the peers whose set-up failed on this case
    (their ops are then missing from the first dict).
    """
    ops: dict[str, dict] = {}
    errors: dict[str, str] = {}
    builders = {
        "plain torch": _plain_torch,
        "curvlinops": _curvlinops,
        "BackPACK": _backpack,
        "torch-secorder": _secorder,
        "PyHessian": _pyhessian,
    }
    for name, build in builders.items():
        if name != "plain torch" and not status[name][0].isdigit():
            continue
        try:
            built = build(c)
        except Exception as err:  # a peer that cannot handle the case is reported, not fatal
            errors[name] = f"set-up failed ({type(err).__name__}: {str(err).splitlines()[0][:80]})"
            continue
        for op, fns in built.items():
            ops.setdefault(op, {})[name] = fns
    return ops, errors


def _plain_torch(c) -> dict:
    from torch.func import functional_call, grad, jacrev, jvp, vjp, vmap

    model = copy.deepcopy(c.model)
    plist = list(model.parameters())
    params = {k: p.detach() for k, p in model.named_parameters()}
    loss_fn, x, y = c.loss_fn, c.x, c.y

    def double_backprop():
        g = torch.autograd.grad(loss_fn(model(x), y), plist, create_graph=True)
        return torch.autograd.grad(g, plist, grad_outputs=c.v_list)

    def loss_of(p):
        return loss_fn(functional_call(model, p, (x,)), y)

    def func_hvp():  # forward-over-reverse
        return jvp(grad(loss_of), (params,), (c.v_dict,))[1]

    def autograd_ggn_vp(vlist=c.v_list):
        out = model(x)
        u = torch.zeros_like(out, requires_grad=True)
        g = torch.autograd.grad(out, plist, u, create_graph=True)
        jv = torch.autograd.grad(g, u, vlist)[0]  # J v by the double-vjp trick
        gl = torch.autograd.grad(loss_fn(out, y), out, create_graph=True)[0]
        hjv = torch.autograd.grad(gl, out, jv)[0]  # H Jv
        return torch.autograd.grad(out, plist, hjv)  # Jᵀ H Jv

    def func_ggn_vp(v):
        def out_of(p):
            return functional_call(model, p, (x,))

        out, jv = jvp(out_of, (params,), (v,))
        hjv = jvp(jacrev(lambda f: loss_fn(f, y)), (out,), (jv,))[1]  # jacrev: grad fails on mse_loss
        return vjp(out_of, params)[1](hjv)[0]

    shapes = [p.shape for p in params.values()]
    sizes = [p.numel() for p in params.values()]

    def func_matmat():  # vmap over the 16 columns, each split into a params-shaped dict
        def column(u):
            v = {k: t.reshape(s) for k, t, s in zip(params, u.split(sizes), shapes)}
            return torch.cat([t.reshape(-1) for t in func_ggn_vp(v).values()])

        return vmap(column)(c.V.T).T

    def sample_loss(p, xn, yn):
        return loss_fn(functional_call(model, p, (xn.unsqueeze(0),)), yn.unsqueeze(0))

    def per_sample():
        return vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, x, y)

    z_over_n = _normalizer(c) / c.x.shape[0]

    def ef_diag():  # (1/N) Σ_n g_n², × Z/N to curvfx's (1/Z) Σ_n ∇ℓ_n² (see the module docstring)
        return {k: g.square().mean(0) * z_over_n for k, g in per_sample().items()}

    sgd = torch.optim.SGD(plist, lr=1e-3)

    def sgd_step():  # the reference first-order step: one gradient and an in-place update
        sgd.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        sgd.step()

    return {
        "HVP": {"double backprop": double_backprop, "torch.func jvp(grad)": func_hvp},
        "GGN-vp": {"autograd": autograd_ggn_vp},
        "GGN matmat, 16 columns": {"torch.func vmap(jvp, vjp)": func_matmat},
        "empirical Fisher diagonal": {"torch.func vmap(grad) ×Z/N": ef_diag},
        "per-sample gradients": {"torch.func vmap(grad)": per_sample},
        "optimizer step": {"SGD (reference)": sgd_step},
    }


def _curvlinops(c) -> dict:
    import curvlinops
    import scipy.sparse.linalg

    model = copy.deepcopy(c.model)
    plist = list(model.parameters())
    data = [(c.x, c.y)]
    kw = {"check_deterministic": False}
    H = curvlinops.HessianLinearOperator(model, c.loss_fn, plist, data, **kw)
    G = curvlinops.GGNLinearOperator(model, c.loss_fn, plist, data, **kw)

    def top_eigenvalue():
        return float(scipy.sparse.linalg.eigsh(H.to_scipy(), k=1, which="LA", tol=1e-3)[0][0])

    return {
        "HVP": {"": lambda: H @ c.v},
        "GGN-vp": {"": lambda: G @ c.v},
        "GGN matmat, 16 columns": {"": lambda: G @ c.V},
        "Hutchinson trace of H, 20 probes": {"": lambda: curvlinops.hutchinson_trace(H, 20)},
        "top Hessian eigenvalue": {"scipy eigsh": top_eigenvalue},
    }


def _backpack(c) -> dict:
    from backpack import backpack, extend
    from backpack.extensions import BatchGrad, DiagGGNExact, DiagGGNMC, SumGradSquared
    from backpack.hessianfree.ggnvp import ggn_vector_product_from_plist
    from backpack.hessianfree.hvp import hessian_vector_product

    model = extend(copy.deepcopy(c.model))
    loss_fn = extend(copy.deepcopy(c.loss_fn))
    plist = list(model.parameters())
    N = c.x.shape[0]

    def hvp():
        return hessian_vector_product(loss_fn(model(c.x), c.y), plist, c.v_list)

    def ggn_vp():
        out = model(c.x)
        return ggn_vector_product_from_plist(loss_fn(out, c.y), out, plist, c.v_list)

    def extension(ext, attr, scale=1.0):
        def run():
            for p in plist:
                p.grad = None
            with backpack(ext):
                loss_fn(model(c.x), c.y).backward()
            return [getattr(p, attr) * scale for p in plist]

        return run

    return {
        "HVP": {"": hvp},
        "GGN-vp": {"": ggn_vp},
        "exact diag GGN": {"DiagGGNExact": extension(DiagGGNExact(), "diag_ggn_exact")},
        "MC diag GGN (1 sample)": {"DiagGGNMC": extension(DiagGGNMC(mc_samples=1), "diag_ggn_mc")},
        "empirical Fisher diagonal": {
            "SumGradSquared ×Z": extension(SumGradSquared(), "sum_grad_squared", _normalizer(c))
        },
        "per-sample gradients": {"BatchGrad ×N": extension(BatchGrad(), "grad_batch", N)},
    }


def _secorder(c) -> dict:
    from torch_secorder.approximations import empirical_fisher_diagonal, gauss_newton_matrix_approximation
    from torch_secorder.core.hvp import gauss_newton_product, hessian_trace, model_hvp

    model = copy.deepcopy(c.model)
    plist = list(model.parameters())
    loss_fn, x, y = c.loss_fn, c.x, c.y
    mse = isinstance(loss_fn, nn.MSELoss)
    scale = 2.0 / c.y.numel() if mse else 1.0  # diag(JᵀJ) → GGN diagonal of a mean MSE

    def diag_ggn():
        return [d * scale for d in gauss_newton_matrix_approximation(model, loss_fn, x, y)]

    return {
        "HVP": {"model_hvp": lambda: model_hvp(model, loss_fn, x, y, c.v_list)},
        "GGN-vp": {"gauss_newton_product": lambda: gauss_newton_product(model, loss_fn, x, y, c.v_list)},
        "exact diag GGN": {
            (
                "gauss_newton_matrix_approximation ×2/(NC)" if mse else "gauss_newton_matrix_approximation"
            ): diag_ggn
        },
        "empirical Fisher diagonal": {
            "empirical_fisher_diagonal": lambda: empirical_fisher_diagonal(model, loss_fn, x, y)
        },
        "Hutchinson trace of H, 20 probes": {
            "hessian_trace": lambda: hessian_trace(lambda: loss_fn(model(x), y), plist, num_samples=20)
        },
    }


def _pyhessian(c) -> dict:
    from pyhessian import hessian
    from pyhessian.utils import hessian_vector_product

    model = copy.deepcopy(c.model)
    cuda = c.x.device.type == "cuda"

    def session():
        for p in model.parameters():  # PyHessian accumulates into .grad (with its graph)
            p.grad = None
        return hessian(model, c.loss_fn, data=(c.x, c.y), cuda=cuda)

    def hvp():
        h = session()
        return hessian_vector_product(h.gradsH, h.params, c.v_list)

    def trace():
        values = session().trace(maxIter=20, tol=0.0)  # tol=0: all 20 probes
        return sum(values) / len(values)

    return {
        "HVP": {"": hvp},
        "Hutchinson trace of H, 20 probes": {"": trace},
        "top Hessian eigenvalue": {
            "power iteration": lambda: session().eigenvalues(maxIter=100, tol=1e-3, top_n=1)[0][0]
        },
    }


def _normalizer(c) -> int:
    """Z, the denominator of the mean loss: N·C for ``MSELoss``, N for the classification losses."""
    return c.y.numel() if isinstance(c.loss_fn, nn.MSELoss) else c.x.shape[0]

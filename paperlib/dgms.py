"""DGMS: Differentiable Gaussian Mixture weight Sharing (Dong et al., ICML 2022; spec ``papers/dgms.md``).

Each DGMS layer holds one K-component Gaussian mixture over all of its weights (spec §1.2). Convention used
everywhere in this module: three length-K tensors ``mu``, ``sigma``, ``pi``; index 0 is the **zero
component** (``mu[0]`` is 0 and never learned); ``pi`` is unnormalised and enters as
``pi~_k = |pi_k| / sum_j |pi_j|``; only ``|sigma|`` matters (the code uses ``sigma**2``).

Read top to bottom:

1. ``init_mixture`` (§1.3): k-means on the flattened weights, the cluster nearest 0 becomes the zero
   component, ``pi`` = cluster fractions, ``sigma`` = cluster spread (or 0.01 for ``method="empirical"``).
2. ``soft_weights`` (§1.4): responsibilities ``r_k = pi~_k N(w; mu_k, sigma_k^2) / (sum_j ... + 1e-11)``,
   ``a = softmax_k(r / tau)`` (the code; ``logits="log_responsibility"`` is the labelled not-from-code
   alternative ``softmax_k(log(pi~_k N_k) / tau)``), ``S(w) = sum_{k>=1} a_k mu_k``.
3. ``hard_weights`` (§1.5): ``P(w) = mu_{k*}``, ``k* = argmax_k``, 0 for the zero component.
4. ``DGMSWeight``: the weight quantizer for :func:`paperlib.quant.quantize_model`; soft in training, hard
   in eval, learnable tau (``learn_tau``), sigma/tau guards of §2 recorded in ``guard_hits``.
5. ``compression_report`` (§1.7) and ``export_hard`` / ``import_hard`` (§2, recommended re-implementation).

Memory (§2.4): the soft assignment is a custom autograd Function that saves only ``w`` (the parameter
itself, no copy) and the K-vectors for backward, and recomputes ``r``/``a`` in chunks of at most
``chunk_elements`` entries of the [K, #weights] matrix in both passes. No [K, #weights] tensor is kept
alive for backward; the transient peak is a few [K, chunk] temporaries. ``impl="reference"`` is a literal
linear-space transcription of the code's formula through plain autograd (O(K #weights) saved), kept as an
oracle and for double backward.

§2.1 qualified (measured here): at tau = 0.01 the assignment is one-hot for TV-1's weights
and for most weights of a layer, but not near decision boundaries (|r_j - r_k| < ~0.3), where ``a`` stays soft
and gradients are amplified by 1/tau. On a freshly initialised ResNet-8 (K = 4 k-means or empirical, K = 16
k-means), 2-9 % of a layer's weights are soft, 3-16 % get |dL/dw| > 1e-10, and sigma, pi, tau get gradients
as large as mu's (see the test
``test_tau_001_is_hard_for_most_weights_but_not_at_decision_boundaries``).

Float detail (found while writing this module, not in the spec): where every responsibility of a weight is
~0 (the weight lies far, > ~7 sigma, from every component, so that ``sum_k pi~_k N_k << 1e-11``), ``r/tau``
is constant to float precision and ``a`` is uniform: the soft weight is ``sum_k mu_k / K`` and the code's
``argmax(a)`` returns index 0, i.e. such weights are pruned in the hard model. ``hard_argmax="softmax"``
(faithful default of :class:`DGMSWeight`) reproduces that; ``"log_joint"`` takes the exact
``argmax_k log(pi~_k N_k)`` (= ``argmax r`` in exact arithmetic), which sends them to their best component.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal

import pandas as pd
import torch
from torch import Tensor, nn

from .quant.core import QuantConv2d, QuantLinear, quantize_model

Logits = Literal["responsibility", "log_responsibility"]
HardArgmax = Literal["softmax", "log_joint"]
Impl = Literal["fused", "reference"]
InitMethod = Literal["kmeans", "empirical"]
KMeansImpl = Literal["lloyd1d", "sklearn"]

EPS = 1e-11  # the code's cfg.EPS in the responsibility denominator (§1.4)
TAU_INIT = 0.01  # the code's default temperature (§1.2)
EMPIRICAL_SIGMA = 0.01  # §1.3, ``--empirical``
SIGMA_MIN = 1e-8  # guard of §2 (recommended re-implementation)
TAU_MIN = 1e-4  # guard of §2
CHUNK_ELEMENTS = 1 << 20  # entries of the [K, chunk] matrix computed at once
LOGITS = ("responsibility", "log_responsibility")
HARD_ARGMAX = ("softmax", "log_joint")
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
KMEANS_DESCRIPTION = {
    "lloyd1d": "paperlib.dgms exact 1-D Lloyd (sorted weights + prefix sums), random distinct initial "
    "centres drawn from the weights with torch.Generator(seed), best inertia of n_init, stop when the "
    "assignment stops changing",
    "sklearn": "sklearn.cluster.KMeans(init='random', algorithm='lloyd', n_init, tol=0, random_state=seed)",
}


# ----------------------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------------------
def check_num_components(num_components: int) -> int:
    """K must be an int >= 2 (one zero component and at least one shared value, §1.2)."""
    if not isinstance(num_components, int) or isinstance(num_components, bool):
        raise TypeError(f"num_components must be an int, got {type(num_components).__name__}")
    if num_components < 2:
        raise ValueError(f"num_components={num_components}: DGMS needs K >= 2 (zero component + 1), e.g. 16")
    return num_components


def bits_of(num_components: int) -> int:
    """The code's bit-width ``floor(log2 K)`` (§1.2), used in its compression ratio."""
    return check_num_components(num_components).bit_length() - 1


def storage_bits(num_components: int) -> int:
    """Bits needed to store one code, ``ceil(log2 K)`` (equals :func:`bits_of` for K = 2^b)."""
    return max(1, (check_num_components(num_components) - 1).bit_length())


def _check_logits(logits: str) -> None:
    if logits not in LOGITS:
        raise ValueError(f"logits={logits!r}: use 'responsibility' (the code) or 'log_responsibility'")


def _check_weight(w: Tensor) -> None:
    if not isinstance(w, Tensor):
        raise TypeError(f"w must be a torch.Tensor, got {type(w).__name__}")
    if not w.is_floating_point():
        raise TypeError(f"w must be a floating tensor, got dtype {w.dtype}")


def _check_mixture(mu: Tensor, sigma: Tensor, pi: Tensor, allow_zero_sigma: bool = False) -> int:
    for name, t in (("mu", mu), ("sigma", sigma), ("pi", pi)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 1 or not t.is_floating_point():
            raise ValueError(f"{name} must be a 1-D floating tensor of length K, got shape {tuple(t.shape)} "
                             f"dtype {t.dtype}")
        if not bool(torch.isfinite(t.detach()).all()):
            raise ValueError(f"{name} contains NaN or inf: {t.detach().tolist()}")
    k = mu.numel()
    if sigma.numel() != k or pi.numel() != k:
        raise ValueError(f"mu, sigma, pi must all have length K; got {k}, {sigma.numel()}, {pi.numel()}")
    check_num_components(k)
    if float(mu.detach()[0]) != 0.0:
        raise ValueError(f"mu[0]={float(mu[0])}: index 0 is the zero component, its mean must be exactly 0")
    if not allow_zero_sigma and bool((sigma.detach() == 0).any()):
        raise ValueError("sigma contains 0 (division by zero in N(w; mu, sigma^2)); pass sigma != 0, or use "
                         f"DGMSWeight(guards=True), which clamps |sigma| >= {SIGMA_MIN}")
    if not bool((pi.detach() != 0).any()):
        raise ValueError("pi is all zero: the normalised mixing weights |pi|/sum|pi| are undefined")
    return k


def _as_tau(tau: float | Tensor, like: Tensor) -> Tensor:
    if isinstance(tau, bool) or not isinstance(tau, int | float | Tensor):
        raise TypeError(f"tau must be a float or a 1-element tensor, got {type(tau).__name__}")
    t = tau if isinstance(tau, Tensor) else torch.tensor(float(tau))
    if t.numel() != 1:
        raise ValueError(f"tau must have one element, got shape {tuple(t.shape)}")
    value = float(t.detach())
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"tau={value}: the temperature must be finite and > 0 (the code starts at 0.01); "
                         f"DGMSWeight(guards=True) clamps a learned tau at {TAU_MIN}")
    return t.to(device=like.device, dtype=like.dtype).reshape(())


def _effective(mu: Tensor, sigma: Tensor, pi: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """(m, sigma_e, pi~): means with m[0] = 0 (no gradient to mu[0]), |sigma|, |pi| / sum|pi| (§1.2)."""
    m = torch.cat([mu[:1].detach().new_zeros(1), mu[1:]]).to(dtype)
    pa = pi.to(dtype).abs()
    return m, sigma.to(dtype).abs(), pa / pa.sum()


# ----------------------------------------------------------------------------------------------------------
# §1.3 initialisation
# ----------------------------------------------------------------------------------------------------------
def _lloyd_1d(xs: Tensor, centres: Tensor, max_iter: int = 1000) -> tuple[Tensor, Tensor, Tensor]:
    """Exact Lloyd iterations on sorted 1-D data ``xs`` from ``centres`` [R, K] (R independent starts, run
    together); returns (centres [R, K] sorted, counts [R, K], inertia [R]).

    In 1-D a cluster is the interval between midpoints of sorted centres, so an iteration is a
    ``searchsorted`` plus prefix sums: O(R K log N) instead of O(R K N). A point exactly on a midpoint goes to
    the lower centre; an empty cluster keeps its centre. Stops when no assignment changes (a start that has
    converged is a fixed point, so running it on is a no-op).
    """
    zero = xs.new_zeros(1)
    cs = torch.cat([zero, torch.cumsum(xs, 0)])
    cs2 = torch.cat([zero, torch.cumsum(xs * xs, 0)])
    n = xs.numel()
    c = torch.sort(centres, dim=-1).values
    first = torch.zeros_like(c[:, :1], dtype=torch.long)
    last = torch.full_like(first, n)
    prev = None
    for _ in range(max_iter):
        cut = torch.searchsorted(xs, (c[:, :-1] + c[:, 1:]) / 2, right=True)
        edges = torch.cat([first, cut, last], dim=1)
        if prev is not None and torch.equal(edges, prev):
            break
        prev = edges
        lo, hi = edges[:, :-1], edges[:, 1:]
        counts = hi - lo
        c = torch.where(counts > 0, (cs[hi] - cs[lo]) / counts.clamp_min(1), c)
        c = torch.sort(c, dim=-1).values
    lo, hi = prev[:, :-1], prev[:, 1:]
    counts = hi - lo
    sums, sq = cs[hi] - cs[lo], cs2[hi] - cs2[lo]
    inertia = (sq - 2 * c * sums + counts * c * c).sum(-1)
    return c, counts, inertia


def kmeans_1d(
    x: Tensor, num_clusters: int, seed: int = 0, n_init: int = 10, impl: KMeansImpl = "lloyd1d"
) -> tuple[Tensor, Tensor]:
    """Seeded Euclidean k-means (Lloyd, random initial centres drawn from the data) of 1-D ``x`` (§1.3).

    Returns ``(centres [K], labels [N])`` in float64 on ``x``'s device, centres sorted ascending. Raises
    ``ValueError`` if ``x`` has fewer distinct values than ``num_clusters`` (choice documented in the module:
    a clear error rather than silently fewer components).
    """
    k = check_num_components(num_clusters)
    if not isinstance(n_init, int) or n_init < 1:
        raise ValueError(f"n_init={n_init!r}: pass an int >= 1")
    xd = x.detach().reshape(-1).to(torch.float64)
    if not bool(torch.isfinite(xd).all()):
        raise ValueError("weights contain NaN or inf; k-means needs finite weights")
    uniq = torch.unique(xd)
    if uniq.numel() < k:
        raise ValueError(f"the weights have {uniq.numel()} distinct values, fewer than K={k} components; "
                         f"use K <= {uniq.numel()}")
    if impl == "sklearn":
        from sklearn.cluster import KMeans

        km = KMeans(k, init="random", n_init=n_init, tol=0.0, max_iter=1000, random_state=seed,
                    algorithm="lloyd").fit(xd.cpu().numpy().reshape(-1, 1))
        centres = torch.as_tensor(km.cluster_centers_.reshape(-1), device=xd.device)
    elif impl == "lloyd1d":
        gen = torch.Generator().manual_seed(seed)
        picks = torch.stack([torch.randperm(uniq.numel(), generator=gen)[:k] for _ in range(n_init)])
        c, counts, inertia = _lloyd_1d(torch.sort(xd).values, uniq[picks.to(uniq.device)])
        inertia = inertia.masked_fill((counts == 0).any(-1), float("inf"))
        best = int(torch.argmin(inertia))
        if not bool(torch.isfinite(inertia[best])):
            raise RuntimeError(f"k-means left an empty cluster in all {n_init} starts; use a smaller K")
        centres = c[best]
    else:
        raise ValueError(f"impl={impl!r}: use 'lloyd1d' or 'sklearn'")
    centres = torch.sort(centres).values
    # nearest centre; a weight exactly on a midpoint goes to the lower centre, as in _lloyd_1d
    return centres, torch.bucketize(xd, (centres[:-1] + centres[1:]) / 2, right=False)


def init_mixture(
    weights: Tensor,
    num_components: int,
    method: InitMethod = "kmeans",
    seed: int = 0,
    *,
    n_init: int = 10,
    kmeans: KMeansImpl = "lloyd1d",
) -> tuple[Tensor, Tensor, Tensor]:
    """Initial mixture ``(mu, sigma, pi)`` of a layer from its pretrained weights (spec §1.3).

    k-means with K clusters on the flattened weights; the cluster whose centre is nearest 0 becomes
    component 0 with its centre set to 0; the others follow sorted by centre. ``pi_k = n_k / N``;
    ``sigma_k = sqrt(sum_{i in k} (w_i - c_k)^2 / (n_k - 1))`` with ``c_0 = 0``, floored at ``SIGMA_MIN``
    for a degenerate cluster (one member, or all members on the centre; the code gives NaN/0 there).
    ``method="empirical"`` keeps k-means' mu and pi and sets every sigma (sigma_0 included) to 0.01.
    Tensors come back on ``weights``' device in its dtype. Fewer distinct weights than K raise ValueError.
    """
    _check_weight(weights)
    k = check_num_components(num_components)
    if method not in ("kmeans", "empirical"):
        raise ValueError(f"method={method!r}: use 'kmeans' or 'empirical'")
    centres, labels = kmeans_1d(weights, k, seed=seed, n_init=n_init, impl=kmeans)
    xd = weights.detach().reshape(-1).to(torch.float64)
    zero = int(torch.argmin(centres.abs()))
    order = torch.cat([torch.tensor([zero]), torch.tensor([i for i in range(k) if i != zero])]).to(xd.device)
    c = centres.clone()
    c[zero] = 0.0
    counts = torch.bincount(labels, minlength=k).to(torch.float64)
    ss = torch.zeros(k, dtype=torch.float64, device=xd.device).index_add_(0, labels, (xd - c[labels]) ** 2)
    sigma = (ss / (counts - 1).clamp_min(1)).sqrt().clamp_min(SIGMA_MIN)
    if method == "empirical":
        sigma = torch.full_like(sigma, EMPIRICAL_SIGMA)
    pi = counts / counts.sum()
    out = (c[order], sigma[order], pi[order])
    return tuple(t.to(dtype=weights.dtype) for t in out)  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------------------
# §1.4 soft assignment, §1.5 hard assignment
# ----------------------------------------------------------------------------------------------------------
def _log_joint(x: Tensor, m: Tensor, sigma_e: Tensor, pi_t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``l[k, i] = log pi~_k + log N(x_i; m_k, sigma_k^2)`` with ``d = x - m`` and ``q = d^2 / sigma^2``."""
    inv_var = sigma_e.pow(-2)[:, None]
    d = x[None, :] - m[:, None]
    q = d * d * inv_var
    c = torch.log(pi_t) - torch.log(sigma_e) - _HALF_LOG_2PI
    return c[:, None] - 0.5 * q, d, q


def _assign(x: Tensor, m: Tensor, sigma_e: Tensor, pi_t: Tensor, tau: Tensor, faithful: bool):
    """(l, d, q, r, z, a) for one chunk: log-joint, responsibilities (log-space), logits, softmax."""
    l, d, q = _log_joint(x, m, sigma_e, pi_t)
    log_den = torch.logaddexp(torch.logsumexp(l, 0), l.new_tensor(math.log(EPS)))
    r = torch.exp(l - log_den)
    z = r / tau if faithful else l / tau
    return l, d, q, r, z, torch.softmax(z, 0)


def _chunk(k: int, chunk_elements: int) -> int:
    return max(1, chunk_elements // k)


class _SoftWeights(torch.autograd.Function):
    """S(w) of §1.4 with a hand-derived, chunk-recomputing backward (saves no [K, N] tensor).

    With ``zeta_k = g a_k (m_k - S)`` (gradient of the softmax logits): ``dL/dtau = -sum zeta z / tau``;
    faithful: ``rho = zeta / tau``, ``lambda_k = r_k (rho_k - sum_j rho_j r_j)``; log-logits:
    ``lambda = zeta / tau`` (``lambda = dL/dl``). Then ``dL/dw = -sum_k lambda_k d_k / sigma_k^2``,
    ``dL/dm_k = sum (g a_k + lambda_k d_k / sigma_k^2)``, ``dL/dsigma_k = sum lambda_k (q_k - 1) / sigma_k``,
    ``dL/dpi~_k = sum lambda_k / pi~_k``.
    """

    @staticmethod
    def forward(ctx, w, m, sigma_e, pi_t, tau, faithful: bool, chunk_elements: int):  # noqa: D102
        flat = w.reshape(-1)
        out = torch.empty_like(flat)
        step = _chunk(m.numel(), chunk_elements)
        for s in range(0, flat.numel(), step):
            a = _assign(flat[s : s + step], m, sigma_e, pi_t, tau, faithful)[-1]
            out[s : s + step] = m @ a
        ctx.save_for_backward(w, m, sigma_e, pi_t, tau)
        ctx.faithful, ctx.step = faithful, step
        return out.view_as(w)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # noqa: D102
        w, m, sigma_e, pi_t, tau = ctx.saved_tensors
        flat, gflat = w.reshape(-1), grad.reshape(-1)
        gw = torch.empty_like(flat)
        gm, gs, glam = (torch.zeros_like(m) for _ in range(3))
        gt = tau.new_zeros(())
        for s in range(0, flat.numel(), ctx.step):
            g = gflat[s : s + ctx.step][None, :]
            _, d, q, r, z, a = _assign(flat[s : s + ctx.step], m, sigma_e, pi_t, tau, ctx.faithful)
            ga = g * a
            zeta = ga * (m[:, None] - m @ a)
            gt += (zeta * z.masked_fill(a == 0, 0)).sum()
            if ctx.faithful:
                rho = zeta / tau
                lam = r * (rho - (rho * r).sum(0, keepdim=True))
            else:
                lam = zeta / tau
            lam_d = lam * d * sigma_e.pow(-2)[:, None]
            gw[s : s + ctx.step] = -lam_d.sum(0)
            gm += ga.sum(1) + lam_d.sum(1)
            gs += (lam * (q - 1)).sum(1) / sigma_e
            glam += lam.sum(1)
        gpi = torch.where(pi_t > 0, glam / pi_t.masked_fill(pi_t == 0, 1), 0)
        return gw.view_as(w), gm, gs, gpi, -gt / tau, None, None


def _soft_reference(
    w: Tensor, m: Tensor, sigma_e: Tensor, pi_t: Tensor, tau: Tensor, faithful: bool
) -> Tensor:
    """Literal linear-space transcription of the code's ``GMM_region_responsibility`` (plain autograd)."""
    x = w.reshape(1, -1)
    pdf = pi_t[:, None] / torch.sqrt(2 * math.pi * sigma_e[:, None] ** 2) * torch.exp(
        -((x - m[:, None]) ** 2) / (2 * sigma_e[:, None] ** 2))
    resp = pdf / (pdf.sum(0) + EPS)
    a = torch.softmax((resp if faithful else torch.log(pdf)) / tau, 0)
    return (a[1:] * m[1:, None]).sum(0).view_as(w)


def _soft(w, m, sigma_e, pi_t, tau, logits: str, impl: str, chunk_elements: int) -> Tensor:
    faithful = logits == "responsibility"
    if impl == "fused":
        return _SoftWeights.apply(w, m, sigma_e, pi_t, tau, faithful, chunk_elements)
    if impl == "reference":
        return _soft_reference(w, m, sigma_e, pi_t, tau, faithful)
    raise ValueError(f"impl={impl!r}: use 'fused' (chunked, O(#weights) memory) or 'reference'")


@torch.no_grad()
def _codes(w, m, sigma_e, pi_t, tau: Tensor | None, logits: str, chunk_elements: int) -> Tensor:
    flat = w.detach().reshape(-1)
    out = torch.empty(flat.shape, dtype=torch.long, device=flat.device)
    step = _chunk(m.numel(), chunk_elements)
    for s in range(0, flat.numel(), step):
        x = flat[s : s + step]
        if tau is None:
            out[s : s + step] = _log_joint(x, m, sigma_e, pi_t)[0].argmax(0)
        else:
            out[s : s + step] = _assign(x, m, sigma_e, pi_t, tau, logits == "responsibility")[-1].argmax(0)
    return out.view(w.shape)


def soft_weights(
    w: Tensor,
    mu: Tensor,
    sigma: Tensor,
    pi: Tensor,
    tau: float | Tensor,
    logits: Logits = "responsibility",
    *,
    impl: Impl = "fused",
    chunk_elements: int = CHUNK_ELEMENTS,
) -> Tensor:
    """Soft-shared weights ``S(w) = sum_{k>=1} a_k(w) mu_k`` (spec §1.4), same shape as ``w``.

    ``a = softmax_k(r_k / tau)`` over the GMM responsibilities ``r_k = pi~_k N_k / (sum_j pi~_j N_j + 1e-11)``
    (``logits="responsibility"``, the code) or ``softmax_k(log(pi~_k N_k) / tau)``
    (``"log_responsibility"``, labelled not-from-code). Differentiable in ``w``, ``mu[1:]``, ``sigma``, ``pi``
    and ``tau``; ``mu[0]`` must be 0 and gets no gradient. Computed in ``w``'s dtype on its device; ``impl``
    picks the chunked custom backward (default) or the code's literal formula under plain autograd.
    """
    _check_weight(w)
    _check_mixture(mu, sigma, pi)
    _check_logits(logits)
    m, sigma_e, pi_t = _effective(mu, sigma, pi, w.dtype)
    return _soft(w, m, sigma_e, pi_t, _as_tau(tau, w), logits, impl, chunk_elements)


def soft_assignment(
    w: Tensor, mu: Tensor, sigma: Tensor, pi: Tensor, tau: float | Tensor, logits: Logits = "responsibility"
) -> Tensor:
    """The soft assignment ``a_k(w)`` of §1.4, shape ``[K, *w.shape]`` (for analysis and plots).

    Plain autograd and O(K #weights) memory: use :func:`soft_weights` in training.
    """
    _check_weight(w)
    _check_mixture(mu, sigma, pi)
    _check_logits(logits)
    m, sigma_e, pi_t = _effective(mu, sigma, pi, w.dtype)
    a = _assign(w.reshape(-1), m, sigma_e, pi_t, _as_tau(tau, w), logits == "responsibility")[-1]
    return a.view(-1, *w.shape)


def hard_codes(
    w: Tensor,
    mu: Tensor,
    sigma: Tensor,
    pi: Tensor,
    *,
    tau: float | Tensor | None = None,
    logits: Logits = "responsibility",
    chunk_elements: int = CHUNK_ELEMENTS,
) -> Tensor:
    """Component index ``k*`` of every weight (int64, shape of ``w``); 0 is the zero component (§1.5).

    ``tau=None``: ``k* = argmax_k log(pi~_k N(w; mu_k, sigma_k^2))`` (= argmax r, exact). With ``tau``: the
    code's ``argmax_k a_k`` computed in ``w``'s dtype (ties, e.g. weights whose responsibilities all vanish,
    go to index 0). No gradient.
    """
    _check_weight(w)
    _check_mixture(mu, sigma, pi)
    _check_logits(logits)
    m, sigma_e, pi_t = _effective(mu, sigma, pi, w.dtype)
    t = None if tau is None else _as_tau(tau, w)
    return _codes(w, m, sigma_e, pi_t, t, logits, chunk_elements)


def hard_weights(
    w: Tensor,
    mu: Tensor,
    sigma: Tensor,
    pi: Tensor,
    *,
    tau: float | Tensor | None = None,
    logits: Logits = "responsibility",
    chunk_elements: int = CHUNK_ELEMENTS,
) -> Tensor:
    """Hard-shared weights ``P(w) = mu_{k*}``, 0 where ``k* = 0`` (spec §1.5); see :func:`hard_codes` for k*.

    At most K distinct values, one of them exactly 0. Differentiable in ``mu[1:]`` only (piecewise constant
    in ``w``).
    """
    codes = hard_codes(w, mu, sigma, pi, tau=tau, logits=logits, chunk_elements=chunk_elements)
    return _effective(mu, sigma, pi, w.dtype)[0][codes]


# ----------------------------------------------------------------------------------------------------------
# the weight quantizer
# ----------------------------------------------------------------------------------------------------------
class DGMSWeight(nn.Module):
    """DGMS weight quantizer (spec §1.2-1.5): soft ``S(W)`` in training, hard ``P(W)`` in eval.

    Parameters: ``mu_rest`` (means of components 1..K-1; ``mu`` prepends the fixed 0), ``sigma`` [K],
    ``pi`` [K] (unnormalised) and ``tau`` (a parameter when ``learn_tau``, the code's default, else a
    buffer). ``guards=True`` (default, §2) uses ``max(|sigma|, 1e-8)`` and ``max(tau, 1e-4)`` and counts the
    forward calls in which each clamp was active in the buffer ``guard_hits = [sigma, tau]``;
    ``guards=False`` raises ValueError on sigma = 0 or tau <= 0 instead of the code's NaN.
    ``hard_argmax``: ``"softmax"`` (the code: argmax of the computed ``a``) or ``"log_joint"`` (exact).
    """

    def __init__(
        self,
        mu: Tensor,
        sigma: Tensor,
        pi: Tensor,
        tau: float = TAU_INIT,
        *,
        learn_tau: bool = True,
        logits: Logits = "responsibility",
        hard_argmax: HardArgmax = "softmax",
        guards: bool = True,
        chunk_elements: int = CHUNK_ELEMENTS,
    ) -> None:
        super().__init__()
        k = _check_mixture(mu, sigma, pi, allow_zero_sigma=guards)
        _check_logits(logits)
        if hard_argmax not in HARD_ARGMAX:
            raise ValueError(f"hard_argmax={hard_argmax!r}: use 'softmax' (the code) or 'log_joint' (exact)")
        tau_t = _as_tau(tau, mu.detach()).clone()
        self.num_components = k
        self.logits, self.hard_argmax, self.guards = logits, hard_argmax, guards
        self.learn_tau, self.chunk_elements = learn_tau, chunk_elements
        self.mu_rest = nn.Parameter(mu.detach()[1:].clone())
        self.sigma = nn.Parameter(sigma.detach().clone())
        self.pi = nn.Parameter(pi.detach().clone())
        if learn_tau:
            self.tau = nn.Parameter(tau_t)
        else:
            self.register_buffer("tau", tau_t)
        self.register_buffer("guard_hits", torch.zeros(2, dtype=torch.long, device=mu.device))

    @classmethod
    def from_layer(
        cls,
        layer: nn.Module | Tensor,
        num_components: int,
        *,
        method: InitMethod = "kmeans",
        seed: int = 0,
        n_init: int = 10,
        kmeans: KMeansImpl = "lloyd1d",
        **kwargs,
    ) -> DGMSWeight:
        """Quantizer initialised by :func:`init_mixture` from ``layer.weight`` (or a weight tensor)."""
        weight = layer if isinstance(layer, Tensor) else getattr(layer, "weight", None)
        if not isinstance(weight, Tensor):
            raise TypeError(f"from_layer needs a layer with .weight or a tensor, got {type(layer).__name__}")
        mu, sigma, pi = init_mixture(weight.detach(), num_components, method, seed, n_init=n_init,
                                     kmeans=kmeans)
        return cls(mu, sigma, pi, **kwargs)

    @property
    def mu(self) -> Tensor:
        """All K means, ``mu[0] = 0`` (not a parameter)."""
        return torch.cat([self.mu_rest.new_zeros(1), self.mu_rest])

    @property
    def bits(self) -> int:
        return bits_of(self.num_components)

    def mixture(self, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Effective ``(m, sigma_e, pi~, tau_e)`` of the forward, guards applied and recorded."""
        dtype = dtype or self.mu_rest.dtype
        mu, sigma, tau = self.mu, self.sigma, self.tau
        if self.guards:
            with torch.no_grad():
                self.guard_hits[0] += (sigma.detach().abs() < SIGMA_MIN).any().long()
                self.guard_hits[1] += (tau.detach() < TAU_MIN).long()
            m, sigma_e, pi_t = _effective(mu, sigma, self.pi, dtype)
            return m, sigma_e.clamp_min(SIGMA_MIN), pi_t, tau.to(dtype).clamp_min(TAU_MIN)
        _check_mixture(mu, sigma, self.pi)
        m, sigma_e, pi_t = _effective(mu, sigma, self.pi, dtype)
        return m, sigma_e, pi_t, _as_tau(tau, mu).to(dtype)

    def soft(self, w: Tensor) -> Tensor:
        """``S(w)`` of §1.4 with this layer's mixture."""
        m, sigma_e, pi_t, tau = self.mixture(w.dtype)
        return _soft(w, m, sigma_e, pi_t, tau, self.logits, "fused", self.chunk_elements)

    def codes(self, w: Tensor) -> Tensor:
        """Hard component index of every weight (int64), by ``hard_argmax``."""
        m, sigma_e, pi_t, tau = self.mixture(w.dtype)
        t = tau.detach() if self.hard_argmax == "softmax" else None
        return _codes(w, m.detach(), sigma_e.detach(), pi_t.detach(), t, self.logits, self.chunk_elements)

    def hard(self, w: Tensor) -> Tensor:
        """``P(w)`` of §1.5: the mean of each weight's component (0 for the zero component)."""
        return self.mu.to(w.dtype)[self.codes(w)]

    def forward(self, w: Tensor) -> Tensor:
        return self.soft(w) if self.training else self.hard(w)

    def guard_report(self) -> dict[str, int]:
        """How many forward calls had |sigma| < 1e-8 and tau < 1e-4 clamped (0 and 0 unless guards fired)."""
        return {"sigma_clamped": int(self.guard_hits[0]), "tau_clamped": int(self.guard_hits[1])}

    def extra_repr(self) -> str:
        return (f"K={self.num_components}, tau={float(self.tau):.4g}, learn_tau={self.learn_tau}, "
                f"logits={self.logits!r}, hard_argmax={self.hard_argmax!r}, guards={self.guards}")


# ----------------------------------------------------------------------------------------------------------
# model-level helpers (§1.1)
# ----------------------------------------------------------------------------------------------------------
def dgms_skip(model: nn.Module) -> list[str]:
    """Layers §1.1 keeps in FP32: the first ``Conv2d`` and every ``Linear`` (names for ``skip=``)."""
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError("model has no Conv2d layer: DGMS (§1.1) shares the weights of convolutions only")
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return [convs[0], *linears]


def quantize_dgms(
    model: nn.Module, num_components: int, skip: Iterable[str] | None = None, **kwargs
) -> nn.Module:
    """``quantize_model`` with :meth:`DGMSWeight.from_layer` on every conv but the first (§1.1), in place.

    ``kwargs`` go to ``from_layer`` (``method``, ``seed``, ``n_init``, ``tau``, ``learn_tau``, ``logits``...).
    """
    check_num_components(num_components)
    return quantize_model(model, weight=lambda layer: DGMSWeight.from_layer(layer, num_components, **kwargs),
                          skip=dgms_skip(model) if skip is None else skip)


def dgms_layers(model: nn.Module) -> dict[str, QuantConv2d | QuantLinear]:
    """The layers of ``model`` whose weight quantizer is a :class:`DGMSWeight`, by name."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, QuantConv2d | QuantLinear) and isinstance(m.weight_quantizer, DGMSWeight)}


# ----------------------------------------------------------------------------------------------------------
# §1.7 metrics, export / import
# ----------------------------------------------------------------------------------------------------------
def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Pack non-negative integer codes < 2^bits into a flat uint8 tensor, ``bits`` bits each (LSB first)."""
    flat = codes.reshape(-1).long()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {1 << bits}) to pack into {bits} bits")
    shifts = torch.arange(bits, device=flat.device)
    stream = ((flat[:, None] >> shifts) & 1).reshape(-1)
    stream = torch.cat([stream, stream.new_zeros(-stream.numel() % 8)]).view(-1, 8)
    return (stream << torch.arange(8, device=flat.device)).sum(1).to(torch.uint8)


def unpack_codes(packed: Tensor, bits: int, numel: int) -> Tensor:
    """Inverse of :func:`pack_codes`: the first ``numel`` codes as int64."""
    stream = ((packed.long()[:, None] >> torch.arange(8, device=packed.device)) & 1).reshape(-1)
    stream = stream[: numel * bits].view(numel, bits)
    return (stream << torch.arange(bits, device=packed.device)).sum(1)


def _fp32_state(model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, Tensor]:
    """Floating parameters and buffers a plain model needs, minus DGMS latent weights and mixtures."""
    drop = {f"{n}.weight" for n in layers}
    prefixes = tuple(f"{n}.weight_quantizer." for n in layers)
    state = {}
    for key, t in model.state_dict().items():
        if key in drop or key.startswith(prefixes) or not t.is_floating_point():
            continue
        state[key] = t.detach().clone()
    return state


def compression_report(model: nn.Module) -> pd.DataFrame:
    """Per-layer sparsity, distinct values, bits, the code's CR and honest bytes (spec §1.7).

    One row per ``Conv2d``/``Linear`` (``kind`` "dgms" or "fp32"), one "other" row (BN and every other
    floating tensor), then ``DGMS layers`` (aggregate over DGMS layers: sparsity, the code's
    ``CR = 32 / ((1 - sparsity) b)`` weighted by layer size) and ``whole model`` (bytes). ``sparsity`` is the
    fraction of weights whose hard assignment is the zero component; ``bytes`` counts packed
    ``ceil(log2 K)``-bit codes + the K-entry codebook + FP32 bias for a DGMS layer and every element at its
    own size otherwise (what :func:`export_hard` stores); ``fp32_bytes`` is the same model unshared.
    """
    layers = dgms_layers(model)
    rows: list[dict] = []
    covered: set[str] = set()
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Conv2d | nn.Linear):
            continue
        w = mod.weight
        bias_bytes = mod.bias.numel() * mod.bias.element_size() if mod.bias is not None else 0
        covered |= {f"{name}.weight", f"{name}.bias"}
        fp32_bytes = w.numel() * w.element_size() + bias_bytes
        row = {"layer": name, "kind": "fp32", "numel": w.numel(), "K": float("nan"), "bits": 32,
               "storage_bits": 32, "sparsity": float("nan"), "distinct_values": float("nan"),
               "cr_code": float("nan"), "fp32_bytes": fp32_bytes, "bytes": fp32_bytes}
        if name in layers:
            q: DGMSWeight = mod.weight_quantizer  # type: ignore[assignment]
            with torch.no_grad():
                codes = q.codes(w)
                hard = q.mu.to(w.dtype)[codes]
            k = q.num_components
            sparsity = float((codes == 0).double().mean())
            sb = storage_bits(k)
            row.update(kind="dgms", K=k, bits=q.bits, storage_bits=sb, sparsity=sparsity,
                       distinct_values=int(torch.unique(hard).numel()),
                       cr_code=32 / ((1 - sparsity) * q.bits) if sparsity < 1 else float("inf"),
                       bytes=-(-w.numel() * sb // 8) + k * q.mu_rest.element_size() + bias_bytes)
            covered |= {f"{name}.weight_quantizer.{k_}" for k_ in q.state_dict()}
        rows.append(row)
    other = [t for key, t in model.state_dict().items() if key not in covered and t.is_floating_point()]
    other_bytes = sum(t.numel() * t.element_size() for t in other)
    rows.append({"layer": "(other fp32 tensors)", "kind": "other", "numel": sum(t.numel() for t in other),
                 "bits": 32, "storage_bits": 32, "fp32_bytes": other_bytes, "bytes": other_bytes})
    df = pd.DataFrame(rows)
    d = df[df.kind == "dgms"]
    if len(d):
        n_total = d.numel.sum()
        zeros = (d.sparsity * d.numel).sum()
        nz_bits = ((1 - d.sparsity) * d.numel * d.bits).sum()
        total = {"layer": "DGMS layers", "kind": "dgms_total", "numel": n_total,
                 "K": d.K.iloc[0] if d.K.nunique() == 1 else float("nan"),
                 "bits": d.bits.iloc[0] if d.bits.nunique() == 1 else float("nan"),
                 "storage_bits": d.storage_bits.iloc[0] if d.storage_bits.nunique() == 1 else float("nan"),
                 "sparsity": zeros / n_total, "distinct_values": d.distinct_values.max(),
                 "cr_code": 32 * n_total / nz_bits if nz_bits > 0 else float("inf"),
                 "fp32_bytes": d.fp32_bytes.sum(), "bytes": d.bytes.sum()}
        df = pd.concat([df, pd.DataFrame([total])], ignore_index=True)
    body = df[df.kind.isin(["dgms", "fp32", "other"])]
    whole = {"layer": "whole model", "kind": "model_total", "numel": body.numel.sum(),
             "fp32_bytes": body.fp32_bytes.sum(), "bytes": body.bytes.sum()}
    df = pd.concat([df, pd.DataFrame([whole])], ignore_index=True)
    df["cr_bytes"] = df.fp32_bytes / df.bytes
    return df


EXPORT_FORMAT = "paperlib.dgms.hard/1"


@torch.no_grad()
def export_hard(model: nn.Module, pack: bool = True) -> dict:
    """A trained DGMS model as integer codes + per-layer codebooks + FP32 tensors (§2, recommended).

    ``{"format", "layers": {name: {"codes", "bits", "numel", "shape", "codebook"}}, "state": {key: tensor}}``:
    codes packed ``ceil(log2 K)`` bits each (``pack=False``: one uint8 per weight, K <= 256), the codebook
    is ``mu`` with 0 at index 0, ``state`` the floating tensors of the plain architecture except the DGMS
    weights. Codes follow each layer's eval-mode (hard) assignment. ``torch.save`` it;
    :func:`import_hard` rebuilds the hard model exactly. Other weight quantizers raise TypeError.
    """
    for name, mod in model.named_modules():
        if isinstance(mod, QuantConv2d | QuantLinear) and not isinstance(
            mod.weight_quantizer, DGMSWeight | nn.Identity
        ):
            raise TypeError(f"layer {name} uses {type(mod.weight_quantizer).__name__}; export_hard stores "
                            "DGMSWeight and float layers only")
    layers = dgms_layers(model)
    out: dict = {"format": EXPORT_FORMAT, "layers": {}, "state": _fp32_state(model, layers)}
    for name, mod in layers.items():
        q: DGMSWeight = mod.weight_quantizer  # type: ignore[assignment]
        codes = q.codes(mod.weight)
        bits = storage_bits(q.num_components)
        if pack:
            stored = pack_codes(codes, bits)
        else:
            if q.num_components > 256:
                raise ValueError(f"{name}: K={q.num_components} > 256 does not fit uint8; use pack=True")
            stored = codes.reshape(-1).to(torch.uint8)
        out["layers"][name] = {"codes": stored, "bits": bits if pack else 8, "numel": codes.numel(),
                               "shape": list(codes.shape), "codebook": q.mu.detach().clone()}
    return out


def package_nbytes(package: dict) -> int:
    """Bytes of the tensors in an :func:`export_hard` package (codes + codebooks + FP32 state)."""
    tensors = list(package["state"].values())
    for entry in package["layers"].values():
        tensors += [entry["codes"], entry["codebook"]]
    return sum(t.numel() * t.element_size() for t in tensors)


@torch.no_grad()
def import_hard(model: nn.Module, package: dict) -> nn.Module:
    """Load an :func:`export_hard` package into a plain (unquantized) model of the same architecture.

    DGMS weights become ``codebook[codes]`` (the hard weights P exactly); everything else is loaded from the
    FP32 state. Returns ``model`` (in place). Any key mismatch beyond integer buffers raises ValueError.
    """
    if not isinstance(package, dict) or package.get("format") != EXPORT_FORMAT:
        raise ValueError(f"not an export_hard package (expected format {EXPORT_FORMAT!r})")
    state = dict(package["state"])
    for name, entry in package["layers"].items():
        if entry["bits"] == 8 and entry["codes"].numel() == entry["numel"]:
            codes = entry["codes"].long()
        else:
            codes = unpack_codes(entry["codes"], entry["bits"], entry["numel"])
        state[f"{name}.weight"] = entry["codebook"][codes].view(entry["shape"])
    result = model.load_state_dict(state, strict=False)
    target = model.state_dict()
    bad_missing = [k for k in result.missing_keys if target[k].is_floating_point()]
    if bad_missing or result.unexpected_keys:
        raise ValueError(f"package does not match the model: missing {bad_missing}, unexpected "
                         f"{list(result.unexpected_keys)}; import into the plain FP32 architecture that was "
                         "quantized (not a quantized model)")
    return model


__all__ = [
    "CHUNK_ELEMENTS", "DGMSWeight", "EPS", "EXPORT_FORMAT", "KMEANS_DESCRIPTION", "SIGMA_MIN", "TAU_INIT",
    "TAU_MIN", "bits_of", "check_num_components", "compression_report", "dgms_layers", "dgms_skip",
    "export_hard", "hard_codes", "hard_weights", "import_hard", "init_mixture", "kmeans_1d", "pack_codes",
    "package_nbytes", "quantize_dgms", "soft_assignment", "soft_weights", "storage_bits", "unpack_codes",
]

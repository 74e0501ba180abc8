"""Error-controlled adaptive reverse-SDE solver with per-sample steps (Jolicoeur-Martineau et al.
2021, "Gotta Go Fast when generating data with score-based models", Alg. 1), on a remembered
Brownian path (rejection sampling with memory, Rackauckas & Nie 2017).

Each step pairs Euler-Maruyama with the improved Euler (stochastic Heun, Roberts 2012) method on the
reverse SDE dx = [f - g^2 score] dt + g dw_bar (Song et al. 2021, eq. 6), with one shared Brownian
increment dW = W(t - h) - W(t) (sqrt(h) z in the paper):

    x'  = x - h F(x, t) + g(t) dW,                 F = f - g^2 score
    x~  = x' - h F(x', t - h) + g(t - h) dW,       x'' = (x + x~) / 2               (Alg. 1)

and measures E = ||(x' - x'') / delta||_2 / sqrt(D) with the mixed tolerance
delta = max(eps_abs, eps_rel max(|x'|, |x'_prev|)) (x'_prev the previous accepted x'). Each
sample accepts (E <= 1: x <- x'', t <- t - h) or rejects on its own and takes the next step
h <- min(t - eps, theta h E^(-r)). The drift and diffusion come from the SDE's reverse()
(``sde.sde``), so VP, sub-VP and VE work alike.

Brownian memory. The paper draws a fresh z after a rejection. E depends on dW, so acceptance then
selects the noise, which biases the samples unless the error norm averages over many dimensions:
on the 2-D ring the mean log-density stayed 8, 11 and 27 standard errors below exact samples on
VP, sub-VP and VE even at rtol 0.01. Here no drawn increment is discarded: each sample follows
one Brownian path W, revealed where the steps need it, so that the path does not depend on the
accept/reject decisions (rejection sampling with memory, RSwM: Rackauckas & Nie 2017, "Adaptive
methods for stochastic differential equations via natural embeddings and rejection sampling with
memory"). A rejected step's point (t - h, W(t - h)) is remembered. A step to s takes W(s) given
the known points around it, l the nearest at or after s (a remembered point, else the current
one) and r the nearest remembered point before s, from the Brownian bridge

    W(s) ~ N(W_l + (t_l - s) / (t_l - t_r) (W_r - W_l), (t_l - s)(s - t_r) / (t_l - t_r)),

e.g. N((h'/h) W, h'(h - h')/h) when a step of h with increment W is retried with h' < h; past the
last remembered point W(s) ~ W_l + N(0, t_l - s) (the step consumes the remembered segments on its
way), and at a remembered point W(s) = W_l, without noise. On the ring at rtol 0.01 the mean
log-density is now within 2.3 standard errors of exact samples on the three SDEs and three seeds
(VE takes 390 steps per sample instead of 300: the noise is no longer the easy one), and under a
rule that rejects large increments the consumed increment keeps its N(0, T - eps) law, where
redrawing gives 0.53 times the variance (tests/test_samplers_fast.py).

Each sample remembers up to ``memory_depth`` (default 8) points, in (B, K + 2) times and
(K + 2, B, *D) values (K + 2 copies of x: the slots, the current point and a write sink), updated
with indexed copies and masks, without a loop over samples. A rejection adds a point, a step past
a point frees its slot. With all K slots taken, the two farthest segments are merged: the second
farthest of the remembered points and the new one is forgotten, to be bridged anew when reached,
which lets that one rejection select the noise; ``memory_overflows`` counts these per sample. On
the ring at rtol 0.01 it happens at 1.5e-4 (VP) to 2.7e-4 (VE) of the steps with K = 8 and never
with K = 16; even K = 3 (10 to 27 merges per sample) keeps the samples within 1.5 standard errors
of the exact log-density. One normal draw per iteration serves every sample (a bridge or an
extension, never both), as before, so with ``seeds=`` sample k still depends on its seed only.

Host synchronisation: the loop is on tensors only (per-sample t, h, accept masks via
``torch.where``); finished samples take h = 0 steps that leave them unchanged. Whether any sample
is still running is read on the host only every ``check_every`` iterations (default 4), trading
at most 2 (check_every - 1) score evaluations of the whole batch after the last sample finishes
for no device-to-host sync inside the other iterations.

Budget. By default (``nfe=None``) there is none: every sample runs to eps by error-controlled
steps. A controller step below ``h_min`` (or not finite: a NaN score) cannot finish in reasonable
time and stops the run with a ``RuntimeError`` naming the samples and times, read at the same
host checks, instead of looping. With an ``nfe`` budget, every sample still running when one
iteration is left takes a step to eps, forced: accepted whatever its error. Forced samples are
not error-controlled (on the 2-D VE ring at ``nfe=200`` the mean log-density is thousands of
nats off), so the report counts them (``forced``), gives the time each had reached
(``t_reached``), and a ``RuntimeWarning`` says so.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from samplers.base import NoiseSource, Sampler, register_sampler
from samplers.fast_base import check_float, check_int
from score_sde.utils import append_dims


@register_sampler("adaptive")
class AdaptiveSDE(Sampler):
    """Gotta-Go-Fast adaptive EM / improved-Euler reverse-SDE sampler (per-sample steps).

    Options:
        nfe: None (default) for no budget: every sample reaches eps by error-controlled steps;
            or a hard budget of score evaluations (2 per iteration over the batch), after which
            the samples still running take one forced step to eps (counted, with a warning).
        eps: final time; samples are draws of p_eps.
        h_min: without a budget, a running sample whose next step would be below h_min stops
            the run with a ``RuntimeError`` (default 1e-6 of the unit time; ignored with nfe).
        rtol, atol: eps_rel and eps_abs of delta (paper: 0.05 and 0.0078 for data in [-1, 1]).
        h_init: first step size (paper: 0.01); theta, r: safety factor and exponent of h.
        check_every: iterations between host-side termination checks.
        memory_depth: remembered points of the Brownian path per sample (>= 2; module
            docstring); costs memory_depth + 2 extra copies of x.
    ``callback(iteration, t, x, None)`` receives the live state (per-sample times t), which later
    iterations overwrite in place: clone what you keep.
    The report adds ``steps_per_sample`` (B,), the iterations each sample was running,
    ``rejected`` (B,), its rejected steps, ``memory_overflows`` (B,), its rejections whose
    point found the memory full, ``forced`` (int), the samples whose last step to eps failed the
    error test and was taken anyway when the budget ran out, and ``t_reached`` (float), the
    smallest time every sample reached by error-controlled steps (the largest time a forced
    sample was at; eps when none was forced).
    """

    order = 1  # strong order of the improved-Euler (extrapolated) pair on additive noise
    nfe_per_step = 2
    stochastic = True
    stops_at_eps = True
    # a config's sampling.nfe is the fast samplers' exact budget (30 for digits); this solver's
    # optional cap is sampling.adaptive_nfe, None by default, so the CLI runs it uncapped
    config_keys = {"nfe": "adaptive_nfe"}

    def __init__(self, *, nfe: int | None = None, eps: float = 1e-3, rtol: float = 0.05,
                 atol: float = 0.0078, h_init: float = 0.01, theta: float = 0.9, r: float = 0.9,
                 check_every: int = 4, memory_depth: int = 8, h_min: float = 1e-6,
                 **options: Any) -> None:
        super().__init__(**options)
        self.nfe = None if nfe is None else check_int("nfe", nfe, 2)
        self.eps = check_float("eps", eps, 0.0)
        self.h_min = check_float("h_min", h_min, 0.0)
        self.rtol = check_float("rtol", rtol, 0.0)
        self.atol = check_float("atol", atol, 0.0)
        self.h_init = check_float("h_init", h_init, 0.0)
        self.theta = check_float("theta", theta, 0.0, 1.0, closed_high=True)
        self.r = check_float("r", r, 0.0)
        self.check_every = check_int("check_every", check_every, 1)
        self.memory_depth = check_int("memory_depth", memory_depth, 2)

    def check_sde(self, sde) -> None:
        if not self.eps < sde.T:
            raise ValueError(f"eps={self.eps} must be below the SDE's end time T={sde.T}")

    def run(self, sde, score_fn, x, *, noise: NoiseSource, progress=False, callback=None):
        """Alg. 1 from x_T (B, *D) to x_eps on a remembered Brownian path; returns (x_eps,
        report)."""
        B, D, nd = x.shape[0], x[0].numel(), x.dim()
        ones = x.new_ones((B,) + (1,) * (nd - 1))  # (B, 1, ..., 1)

        def coefficients(t, h):
            """Per-sample (B, 1, ...) factors of x - h F(x, t) + g dW, F = f - g^2 score:
            f(x, t) = f(1, t) x as every SDE here is linear in x (sde_lib's module docstring)."""
            f, g = sde.sde(ones, t)
            g = append_dims(g, nd)
            return 1 - h * f, h * g * g, g

        t = torch.full((B,), sde.T, device=x.device, dtype=x.dtype)
        h = torch.full_like(t, self.h_init)
        steps = torch.zeros(B, device=x.device, dtype=torch.long)
        rejected, overflows = torch.zeros_like(steps), torch.zeros_like(steps)
        # Each sample's Brownian path W (W(T) = 0) at the times tau (B, K + 2), values in mem
        # (K + 2, B, *D): slots 0..K-1 remember points of the future path (tau < t; a free slot
        # holds inf), slot K is the current point (t, W(t)), and slot K + 1 takes the writes of
        # samples with nothing to store, so that one indexed copy serves the whole batch.
        K = self.memory_depth
        cur, trash = K, K + 1
        tau = torch.full((B, K + 2), math.inf, device=x.device, dtype=x.dtype)
        tau[:, cur] = sde.T
        known, remembered = tau[:, :cur + 1], tau[:, :K]
        mem = x.new_zeros((K + 2,) + x.shape)
        rows, w_cur = mem.view((K + 2) * B, -1), mem[cur]
        sample_index, slot_index = (torch.arange(n, device=x.device) for n in (B, K))
        # Buffers reused by every iteration (in-place arithmetic, no per-step allocation).
        x = x.clone()
        x1, x2, work, spare, spare_prev = (torch.empty_like(x) for _ in range(5))
        dw, w_new, w_l, w_r = (x.new_empty(x.shape) for _ in range(4))  # contiguous: viewed (B, -1)
        x_prev, abs_prev = x.clone(), x.abs()
        budget = self.nfe is not None
        n_iter = self.nfe // 2 if budget else None
        # Without a budget: running samples whose controller step fell below h_min (or is NaN),
        # OR-ed over iterations and read at the host checks.
        stalled = torch.zeros(B, device=x.device, dtype=torch.bool)
        forced, t_forced = torch.zeros_like(stalled), t  # set by the last iteration of a budget
        iterations = 0
        it = 0
        while n_iter is None or it < n_iter:
            if it % self.check_every == 0 and it > 0:
                if not budget and bool(stalled.any()):
                    raise _stalled_error(stalled, t, h, self.h_min)
                if not bool((t > self.eps).any()):
                    break
            iterations += 1
            running = t > self.eps
            last = it == n_iter - 1 if budget else False  # budget exhausted: forced step to eps
            if last:
                t_forced = t
            left = t - self.eps
            h = left if last else torch.minimum(h, left)
            h_b = append_dims(h, nd)
            # A step to eps lands on eps exactly: t - (t - eps) may round above it, which would
            # leave a last step of one ulp (where the error estimate is meaningless).
            s = torch.where(h < left, t - h, self.eps).clamp_(min=self.eps)
            # W(s) from the known points next to s: l, the nearest at or after s (the current
            # point at the latest; l = s when s is remembered), and r, the nearest before s.
            s_b = s[:, None]
            t_l, j_l = torch.where(known >= s_b, known, math.inf).min(1)
            t_r, j_r = torch.where(known < s_b, known, -math.inf).max(1)
            torch.index_select(rows, 0, j_l * B + sample_index, out=w_l.view(B, -1))
            torch.index_select(rows, 0, j_r * B + sample_index, out=w_r.view(B, -1))
            # Brownian bridge: W(s) ~ N(W_l + (span / gap)(W_r - W_l), span (s - t_r) / gap),
            # span = t_l - s, gap = t_l - t_r; past the last remembered point (no r, t_r = -inf)
            # W_l + N(0, span); exactly W_l when s is remembered (span = 0). One draw per
            # iteration whatever each sample needs (a bridge or an extension, never both), so
            # that sample k's draws come from its own generator alone.
            span = t_l - s
            gap = t_l - t_r
            frac = span / gap  # 0 without r
            var = span * torch.where(t_r > -math.inf, (s - t_r) / gap, 1.0)
            noise.randn_like(x, out=dw)
            torch.lerp(w_l, w_r, append_dims(frac, nd), out=w_new)
            w_new.addcmul_(dw, append_dims(var.sqrt(), nd))
            torch.sub(w_new, w_cur, out=dw)  # the step's increment W(s) - W(t)
            a, b, c = coefficients(t, h_b)  # Euler-Maruyama: x' = a x + b score + c dW
            torch.mul(x, a, out=x1).addcmul_(score_fn(x, t), b).addcmul_(dw, c)
            a, b, c = coefficients(s, h_b)  # x~ from x' with the same dW; x'' = (x + x~)/2
            torch.mul(x1, a, out=x2).addcmul_(score_fn(x1, s), b).addcmul_(dw, c)
            x2.add_(x).mul_(0.5)
            # delta = max(atol, rtol max(|x'|, |x'_prev|)); E = ||(x' - x'') / delta|| / sqrt(D)
            torch.abs(x1, out=work)
            torch.maximum(work, abs_prev, out=work).mul_(self.rtol).clamp_(min=self.atol)
            err = torch.linalg.vector_norm(((x1 - x2) / work).reshape(B, -1), dim=1)
            err = err / math.sqrt(D)
            if last:
                forced = running & ~(err <= 1.0)
            accept = (err <= 1.0) | last
            keep = append_dims(accept, nd)
            # Accepted: W(t) <- W(s). Rejected: W(s) joins the remembered points unless it is one
            # already. With every slot taken, the two farthest segments among the remembered
            # points and s are merged (the second farthest point is forgotten; counted).
            new = ~accept & (span > 0)
            t_free, j_free = remembered.max(1)
            has_free = t_free == math.inf
            t_1, j_1 = remembered.min(1)  # the farthest remembered point, and the second:
            t_2, j_2 = torch.where(slot_index == j_1[:, None], math.inf, remembered).min(1)
            slot = torch.where(has_free, j_free, torch.where(s < t_1, j_1, j_2))
            store = new & (has_free | (s < t_1) | (s > t_2))
            overflows += new & ~has_free
            target = torch.where(accept, cur, torch.where(store, slot, trash))
            tau.scatter_(1, target[:, None], s_b)
            rows.index_copy_(0, target * B + sample_index, w_new.view(B, -1))
            remembered.masked_fill_(remembered >= known[:, cur:], math.inf)  # passed: free again
            # x <- x'' and x'_prev <- x' where accepted, into spare buffers that are then swapped
            # (torch.where, not a 0/1 blend: a rejected step may hold inf).
            x, spare = torch.where(keep, x2, x, out=spare), x
            x_prev, spare_prev = torch.where(keep, x1, x_prev, out=spare_prev), x_prev
            torch.abs(x_prev, out=abs_prev)
            t = torch.where(accept, s, t)
            # h <- theta h E^(-r). Finished samples have h = 0 and err = 0; the clamp keeps their
            # next h finite (0). exp(-r log E), not pow: CPU pow kernels round differently in
            # their vectorised and scalar loops (last bit, 2% of float64 inputs), which made a
            # sample's steps depend on the batch size; exp and log agree.
            h = self.theta * h * err.clamp(min=1e-12).log_().mul_(-self.r).exp_()
            steps += running
            rejected += running & ~accept
            if not budget:
                # a step below h_min (or NaN) stalls, unless what is left to eps is shorter
                stalled |= (t > self.eps) & ~(h >= (t - self.eps).clamp(max=self.h_min))
            if callback is not None:
                callback(it, t, x, None)
            it += 1
        if not budget and bool(stalled.any()):
            raise _stalled_error(stalled, t, h, self.h_min)
        # Read once, after the loop: how many samples the budget forced, and from where.
        n_forced = int(forced.sum())
        t_reached = float(torch.where(forced, t_forced, self.eps).max()) if n_forced else self.eps
        if n_forced:
            warnings.warn(
                f"adaptive: the nfe={self.nfe} budget ran out before {n_forced} of {B} samples "
                f"reached eps={self.eps:g}: they took one forced step to eps, whose error was "
                f"not controlled, from times up to t={t_reached:.4g} (info['forced'], "
                f"info['t_reached']); pass nfe=None for no budget, or a larger nfe",
                RuntimeWarning, stacklevel=2)
        report = {"steps_per_sample": steps, "rejected": rejected, "iterations": iterations,
                  "memory_overflows": overflows, "forced": n_forced, "t_reached": t_reached}
        return x, report


def _stalled_error(stalled: torch.Tensor, t: torch.Tensor, h: torch.Tensor,
                   h_min: float) -> RuntimeError:
    """The error of a run without a budget whose step size fell below h_min (or is NaN)."""
    n = int(stalled.sum())
    t_max = float(t[stalled].max())
    h_small = float(h[stalled].nan_to_num(nan=0.0).min())
    return RuntimeError(
        f"adaptive: the step size of {n} of {len(t)} samples fell below h_min={h_min:g} "
        f"(smallest step {h_small:.3g}, at times up to t={t_max:.4g}): the error control "
        "cannot meet rtol/atol there (a non-finite or inaccurate score?). Raise rtol/atol, "
        "lower h_min, or pass an nfe budget to force the remaining steps")


__all__ = ["AdaptiveSDE"]

"""Client-level DP in the round: the client's privatised reply and the server's noisy release.

DP-FedAvg (McMahan et al., ICLR 2018, arXiv 1710.06963) in this project's own round
loop (docs/privacy.md, "Why not Flower's DP wrappers"):

* client (:func:`privatise_update`, called by
  :meth:`ubsmoe.fl.client_runtime.ClientRuntime.train_round` after local training):
  ``delta = x_c - x_sent`` of the privatised groups is clipped to C (central) and
  noised with ``sigma C`` (local); the expert counts become the clipped utilization
  histogram ``a / n`` (local: plus ``sigma_k B`` noise), the example count 1
  (uniform client weights). The upload is dense
  (:func:`ubsmoe.fl.messages.update_to_content` with ``dense=True``).
* server (:class:`ServerRelease`, handed to the method's aggregator through
  :meth:`ubsmoe.methods.base.Method.set_release`): Gaussian noise ``sigma C / n``
  on the uniform mean of the privatised tensors (central) and ``sigma_k B / n`` on
  the utilization before DMR's phi update, clamped at 0; the round's
  signal-to-noise ratio; :func:`round_accountant` composes the rounds.

With ``privacy.mode=off`` nothing here runs.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch

from ubsmoe.config import PrivacyConfig, RunConfig
from ubsmoe.core.accountant import PrivacyAccountant
from ubsmoe.core.privacy import (
    add_gaussian_noise,
    clip_counts,
    clip_update,
    counts_histogram,
    counts_sensitivity,
    noise_counts,
    noise_generator,
    noise_std_on_mean,
    privatise_local,
    select_groups,
    signal_to_noise,
)
from ubsmoe.methods import ClientUpdate

__all__ = ["ServerRelease", "combined", "counts_released", "finite_or_none", "privatise_update",
           "round_accountant"]

# Stream keys of noise_generator(seed, round, key...) besides a client's own id.
_SERVER_UPDATE_KEY = -1
_SERVER_COUNTS_KEY = -2
_CLIENT_COUNTS_KEY = 1


def counts_released(privacy: PrivacyConfig, num_layers: int) -> bool:
    """Whether clients release (noised) utilization counts: ``sigma_k > 0`` on an SMoE model."""
    return privacy.counts_noise_multiplier > 0 and num_layers > 0


def privatise_update(update: ClientUpdate, sent: dict[str, torch.Tensor], privacy: PrivacyConfig,
                     round_idx: int, max_top_k: int) -> ClientUpdate:
    """The client's DP reply: clipped (local: and noised) update, histogram counts, weight 1.

    Args:
        update: the client's clean update (full adapters, raw ``[L, E]`` counts).
        sent: name -> the global adapters it started from (x_sent).
        privacy: the run's privacy section (mode ``central`` or ``local``).
        round_idx: 1-based round (a key of the noise stream).
        max_top_k: K_max, the largest top-k a client may run (the model's native
            top-k): the counts' sensitivity is ``sqrt(L K_max)``.

    Returns:
        A new update: privatised tensors ``x_sent + delta'`` (unchanged tensors kept
        as they are when nothing was clipped or noised, so sigma 0 with no clipping
        is bitwise DP off), ``expert_counts`` the ``[L, E]`` histogram (zeros when
        the counts are withheld), ``token_counts`` ones ``[L]`` and ``num_examples``
        1. The loss and the other scalar metrics are left as they are: they are
        not privatised (docs/privacy.md).

    Raises:
        ValueError: a non-finite update entry.
    """
    private, _ = select_groups(list(sent), privacy.groups)
    delta = {n: update.adapters[n] - sent[n] for n in private}  # [*] per tensor
    if privacy.mode == "local":
        gen = noise_generator(privacy.seed, round_idx, update.client_id)
        released, scale, _ = privatise_local(delta, privacy.clipping_norm,
                                             privacy.noise_multiplier, gen)
    else:
        released, scale, _ = clip_update(delta, privacy.clipping_norm)
    adapters = dict(update.adapters)
    noised = privacy.mode == "local" and privacy.noise_multiplier > 0
    if scale != 1.0 or noised:
        for n in private:
            x = sent[n].to(torch.float64) + released[n].to(torch.float64)
            adapters[n] = x.to(update.adapters[n].dtype)
    num_layers = update.expert_counts.shape[0]
    counts = torch.zeros(update.expert_counts.shape, dtype=torch.float64)  # [L, E]
    if counts_released(privacy, num_layers):
        bound = counts_sensitivity(num_layers, max_top_k)
        counts, _ = clip_counts(counts_histogram(update.expert_counts, update.token_counts), bound)
        if privacy.mode == "local":
            gen = noise_generator(privacy.seed, round_idx, update.client_id,
                                  _CLIENT_COUNTS_KEY)
            counts = noise_counts(counts, privacy.counts_noise_multiplier, bound, 1, gen, "sum")
    return replace(update, adapters=adapters, num_examples=1, expert_counts=counts,
                   token_counts=torch.ones(num_layers, dtype=torch.float64))


class ServerRelease:
    """The server's side of one DP round, called by the method's aggregator.

    Args:
        privacy: the run's privacy section (``central`` or ``local``).
        sent: name -> the global adapters sent this round (x_sent).
        round_idx: 1-based round (a key of the noise stream).
        counts_bound: the counts' sensitivity B = ``sqrt(L K_max)`` (0: no SMoE layer).

    Attributes:
        stats: after :meth:`adapters`: ``signal_norm`` (``||mean delta||`` of the
            privatised tensors before the noise; in local mode an unbiased estimate
            from the noisy mean: ``sqrt(max(0, ||mean||^2 - d s^2))``), ``noise_std``
            (per coordinate on the mean), ``noise_norm`` (``s sqrt(d)``), ``snr``
            (their ratio, :func:`ubsmoe.core.privacy.signal_to_noise`; None when no
            noise), ``coordinates`` (d) and ``clients`` (n).
    """

    def __init__(self, privacy: PrivacyConfig, sent: dict[str, torch.Tensor], round_idx: int,
                 counts_bound: float) -> None:
        self.privacy = privacy
        self.sent = sent
        self.round_idx = round_idx
        self.counts_bound = counts_bound
        self.private, _ = select_groups(list(sent), privacy.groups)
        self.stats: dict[str, Any] = {}

    def adapters(self, mean: dict[str, torch.Tensor], num_clients: int) -> dict[str, torch.Tensor]:
        """Central: ``mean + N(0, (sigma C / n)^2)`` on the privatised tensors; local: unchanged.

        Args:
            mean: name -> the uniform mean of the n replies' adapters.
            num_clients: n, the replies in the mean.

        Returns:
            name -> the released tensors (dtype of ``mean``).
        """
        p = self.privacy
        d = sum(mean[n].numel() for n in self.private)
        std = noise_std_on_mean(p.mode, p.noise_multiplier, p.clipping_norm, num_clients)
        sq = sum(float((mean[n].to(torch.float64) - self.sent[n].to(torch.float64)).pow(2).sum())
                 for n in self.private)
        out = dict(mean)
        if p.mode == "central":
            gen = noise_generator(p.seed, self.round_idx, _SERVER_UPDATE_KEY)
            out.update(add_gaussian_noise({n: mean[n] for n in self.private}, p.noise_multiplier,
                                          p.clipping_norm, num_clients, gen))
            signal = math.sqrt(sq)
        else:  # local: E ||mean||^2 = ||signal||^2 + d s^2
            signal = math.sqrt(max(0.0, sq - d * std ** 2))
        snr = signal_to_noise(signal, std, d) if d else math.inf
        self.stats = {"signal_norm": signal, "noise_std": std, "noise_norm": std * math.sqrt(d),
                      "snr": None if math.isinf(snr) else snr, "coordinates": d,
                      "clients": num_clients}
        return out

    def utilization(self, utilization: torch.Tensor, num_clients: int) -> torch.Tensor:
        """The ``[L, E]`` utilization u~ (mean of histograms) as released, clamped at 0.

        Central: plus ``N(0, (sigma_k B / n)^2)`` (:func:`ubsmoe.core.privacy.noise_counts`);
        local: the clients' histograms carry their own noise. Clamping is
        post-processing (DMR's phi update refuses negative utilization).
        """
        if self.privacy.mode != "central" or self.counts_bound <= 0:
            return utilization.clamp_min(0.0)
        gen = noise_generator(self.privacy.seed, self.round_idx, _SERVER_COUNTS_KEY)
        return noise_counts(utilization, self.privacy.counts_noise_multiplier, self.counts_bound,
                            num_clients, gen, clamp_nonnegative=True)


def round_accountant(cfg: RunConfig, num_layers: int) -> PrivacyAccountant:
    """The run's accountant: sampling rate ``round(fl.fraction N) / N`` (as sampled).

    Args:
        cfg: the run config (``privacy`` on).
        num_layers: SMoE layers of the model (0: no counts released).
    """
    n = cfg.fl.num_clients
    q = min(n, max(1, round(cfg.fl.fraction * n))) / n
    return PrivacyAccountant.from_config(cfg.privacy, q, counts_released(cfg.privacy, num_layers))


def finite_or_none(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with every infinite float (epsilon without noise) as None, for strict JSON."""
    return {k: None if isinstance(v, float) and math.isinf(v) else v for k, v in record.items()}


def combined(spent: dict[str, Any]) -> dict[str, Any]:
    """The accountant's record with its ``noise_multiplier`` (update and counts combined,
    :func:`ubsmoe.core.accountant.combined_noise_multiplier`) renamed
    ``combined_noise_multiplier``, so it does not read as ``privacy.noise_multiplier``."""
    out = dict(spent)
    out["combined_noise_multiplier"] = out.pop("noise_multiplier")
    return out

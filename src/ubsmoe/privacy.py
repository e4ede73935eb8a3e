"""Client-level differential privacy for the adapter updates and the expert-utilization counts.

DP-FedAvg: McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent
Language Models", ICLR 2018 (arXiv 1710.06963): each sampled client's update
``delta_c = x_c - x_sent`` is clipped to an L2 norm C over all privatised tensors at
once, the server sums the clipped updates and adds Gaussian noise of standard
deviation ``sigma * C`` to the sum (``sigma * C / n`` on the uniform mean of n
replies). Accounting: the sampled Gaussian mechanism under Renyi DP (Mironov,
"Renyi Differential Privacy", CSF 2017, arXiv 1702.07476; Mironov, Talwar, Zhang,
arXiv 1908.10530) as Opacus implements it (:class:`opacus.accountants.RDPAccountant`).

Two mechanisms are released every round, and both are covered here:

* the adapter update (groups of parameters chosen by ``privacy.groups``):
  :func:`clip_update` on the client, :func:`add_gaussian_noise` on the server
  (``central``) or :func:`privatise_local` on the client (``local``);
* the per-client expert-utilization counts ``a_{c,l,i}`` (tokens of client c routed
  to expert i at SMoE layer l) that DMR's server update (UB-SMoE) and A3SMoE's
  weights use: :func:`counts_histogram` turns them into ``h_{c,l,i} = a_{c,l,i} /
  n_{c,l}`` (a token visits an expert at most once, so every entry is in [0, 1] and
  a layer's row sums to K_c), whose L2 norm is at most ``sqrt(L * K_max)``
  (:func:`counts_sensitivity`); :func:`clip_counts` enforces that bound and
  :func:`noise_counts` adds ``counts_noise_multiplier * bound`` of Gaussian noise.

Both mechanisms see the same sampled clients in the same round, so one round is a
single sampled Gaussian mechanism with the combined noise multiplier
``(sigma_u^-2 + sigma_k^-2)^-1/2`` (:func:`combined_noise_multiplier`), which
:class:`PrivacyAccountant` composes over rounds.

Pure PyTorch (and Opacus's accountant, imported lazily); nothing here knows about
Flower. Docs: ``docs/privacy.md``.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "AGGREGATION_OK",
    "GROUPS",
    "MODES",
    "PRIVACY_METHODS",
    "PrivacyAccountant",
    "PrivacyConfig",
    "add_gaussian_noise",
    "calibrate_noise_multiplier",
    "clip_counts",
    "clip_update",
    "combined_noise_multiplier",
    "compatibility_errors",
    "counts_histogram",
    "counts_sensitivity",
    "noise_counts",
    "noise_generator",
    "noise_std_on_mean",
    "param_group",
    "privatise_local",
    "select_groups",
    "signal_to_noise",
]

MODES = ("off", "central", "local")
# Parameter groups that ``privacy.groups`` may name (or "all"), see :func:`param_group`.
GROUPS = ("experts", "shared", "router", "phi")
# Weightings of the mean (plain strings, as the server's weighting setting names them).
WEIGHTINGS = ("uniform", "data")
# The only server aggregation compatible with DP here.
AGGREGATION_OK = "mean"

# Methods and the privacy modes each supports, with the reason for what it lacks.
# (The merger may move these onto each Method class as ClassVars; STYLE.md keeps name
# comparisons in the registry.)
PRIVACY_METHODS: dict[str, tuple[tuple[str, ...], str]] = {
    "fedit": (("central", "local"), ""),
    "smoe": (("central", "local"), ""),
    "smoe_llb": (("central", "local"), ""),
    "ubsmoe": (("central", "local"), ""),
    "a3smoe": (("local",), (
        "A3SMoE weights each expert by each client's own counts, which central DP "
        "never releases per client; use privacy.mode=local")),
    "hetlora": ((), (
        "HetLoRA weights each client by S_c = ||s_c B_c A_c||_F of its own update, "
        "so one client's weight, and its share of the mean, is unbounded")),
    "flexlora": ((), (
        "FlexLoRA merges data-size-weighted full-rank products B_c A_c and "
        "re-factorises them by SVD, outside the clipped update space")),
    "a3smoe_flexlora": ((), (
        "it merges full-rank products B_c A_c by SVD (as FlexLoRA) with "
        "A3SMoE's per-client count weights")),
    "flora": ((), (
        "FLoRA stacks each client's factors side by side, so each client's update "
        "appears in the global adapters on its own, not inside a noised sum")),
    "florist": ((), (
        "FLoRIST stacks each client's factors (as FLoRA) before its SVD "
        "thresholding, so no noised sum hides one client")),
}

_EXPERT_SUFFIXES = (".gate_up_lora.A", ".gate_up_lora.B", ".down_lora.A", ".down_lora.B")


def _config_error(message: str) -> Exception:
    """The project's ConfigError (imported lazily: config.py is being restructured)."""
    from ubsmoe.errors import ConfigError

    return ConfigError(message)


def _bad(name: str, value: Any, allowed: str) -> str:
    """One error line in config.py's format: ``name: got value, expected allowed``."""
    return f"{name}: got {value!r}, expected {allowed}"


@dataclass
class PrivacyConfig:
    """The ``privacy`` section: client-level DP for updates and utilization counts.

    Attributes:
        mode: ``off`` (default; nothing changes), ``central`` (clients clip, the
            server adds noise to the sum: a trusted server, protected outputs) or
            ``local`` (each client clips and noises its own update and counts: the
            server is not trusted).
        noise_multiplier: sigma >= 0, the update noise's standard deviation in units
            of ``clipping_norm`` (on the sum in central mode, on each client's update
            in local mode). 0 adds no noise (no DP; epsilon is infinite).
        clipping_norm: C > 0, the L2 bound on one client's update over all
            privatised tensors together. ``inf`` means no clipping and is allowed
            only with ``noise_multiplier == 0`` (then the update path is exactly
            DP off).
        delta: the delta at which epsilon is reported, in (0, 1); typically below
            1 / num_clients.
        groups: which parameter groups are privatised: ``["all"]`` (default) or a
            non-empty subset of ``experts`` (per-expert LoRA), ``shared`` (every
            other LoRA adapter, e.g. attention), ``router`` (trainable router
            weights), ``phi`` (DMR's modulation). Groups left out are uploaded in
            the clear and are not protected (see docs/privacy.md).
        counts_noise_multiplier: sigma_k >= 0 for the utilization counts, in units
            of their sensitivity :func:`counts_sensitivity`; 0 withholds the counts
            under DP (clients do not send them), which methods that need them refuse
            (:func:`compatibility_errors`).
        noise_seed: None (default): the noise generators are seeded from the OS's
            entropy, a fresh secret every run. An integer makes the noise
            reproducible, and anyone who knows it can regenerate and subtract the
            noise, so a seeded run is for experiments only.

    Raises:
        ConfigError: one line per bad field, naming it, its value and what is allowed.
    """

    mode: str = "off"
    noise_multiplier: float = 1.0
    clipping_norm: float = 1.0
    delta: float = 1e-5
    groups: list[str] = field(default_factory=lambda: ["all"])
    counts_noise_multiplier: float = 1.0
    noise_seed: int | None = None

    def __post_init__(self) -> None:
        errors = []
        if self.mode not in MODES:
            errors.append(_bad("privacy.mode", self.mode, f"one of {', '.join(MODES)}"))
        if not _is_number(self.noise_multiplier) or not 0 <= self.noise_multiplier < math.inf:
            errors.append(_bad("privacy.noise_multiplier", self.noise_multiplier,
                               "a finite number >= 0"))
        if not _is_number(self.clipping_norm) or not self.clipping_norm > 0:
            errors.append(_bad("privacy.clipping_norm", self.clipping_norm,
                               "a number > 0 (inf: no clipping, only with noise_multiplier 0)"))
        elif (math.isinf(self.clipping_norm) and _is_number(self.noise_multiplier)
              and self.noise_multiplier > 0):
            errors.append(_bad("privacy.clipping_norm", self.clipping_norm,
                               "a finite number > 0 when privacy.noise_multiplier > 0 "
                               "(the noise is noise_multiplier x clipping_norm)"))
        if not _is_number(self.delta) or not 0 < self.delta < 1:
            errors.append(_bad("privacy.delta", self.delta, "a number in (0, 1), e.g. 1e-5"))
        groups = [self.groups] if isinstance(self.groups, str) else self.groups
        if (not isinstance(groups, Sequence) or not groups
                or not all(isinstance(g, str) for g in groups)
                or (list(groups) != ["all"] and not set(groups) <= set(GROUPS))
                or len(set(groups)) != len(groups)):
            errors.append(_bad("privacy.groups", self.groups,
                               f"[all] or a non-empty list of distinct names from "
                               f"{', '.join(GROUPS)}"))
        else:
            self.groups = list(groups)
        if (not _is_number(self.counts_noise_multiplier)
                or not 0 <= self.counts_noise_multiplier < math.inf):
            errors.append(_bad("privacy.counts_noise_multiplier", self.counts_noise_multiplier,
                               "a finite number >= 0 (0: counts withheld under DP)"))
        if self.noise_seed is not None and (isinstance(self.noise_seed, bool)
                                            or not isinstance(self.noise_seed, int)
                                            or self.noise_seed < 0):
            errors.append(_bad("privacy.noise_seed", self.noise_seed,
                               "null (secret OS entropy) or an integer >= 0"))
        if errors:
            raise _config_error("\n".join(errors))

    @property
    def enabled(self) -> bool:
        """True unless ``mode == "off"``."""
        return self.mode != "off"


def _is_number(x: Any) -> bool:
    """A real number (int or float, not bool), possibly inf; False for NaN."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x)


def compatibility_errors(privacy: PrivacyConfig, method: str, aggregation: str = "mean",
                         weighting: str = "uniform", reject_norm_multiple: float = 0.0,
                         method_uses_counts: bool | None = None) -> list[str]:
    """Why this privacy setting cannot run with the rest of the run's settings.

    Args:
        privacy: the privacy section.
        method: the registered method name (``method.name``).
        aggregation: ``fl.aggregation`` (only ``mean`` works with DP).
        weighting: how the server weights clients in the mean: ``uniform`` (DP
            requires it) or ``data`` (p_c = n_c / sum n).
        reject_norm_multiple: ``fl.reject_norm_multiple`` (must be 0 with DP).
        method_uses_counts: whether the method's server step consumes the clients'
            expert counts (DMR's server phi update, A3SMoE's weights); None: assume
            so for ``ubsmoe`` and ``a3smoe``.

    Returns:
        One line per conflict (empty when the combination is allowed, and always
        when ``privacy.mode == "off"``).
    """
    if not privacy.enabled:
        return []
    mode = privacy.mode
    errors = []
    if method not in PRIVACY_METHODS:
        supported = sorted(m for m, (modes, _) in PRIVACY_METHODS.items() if modes)
        errors.append(f"method: got {method!r} with privacy.mode={mode}, expected one of "
                      f"{', '.join(supported)} (no privacy analysis for it)")
    else:
        modes, reason = PRIVACY_METHODS[method]
        if mode not in modes:
            allowed = " or ".join(f"{m!r}" for m in (*modes, "off"))
            errors.append(f"privacy.mode: got {mode!r} with method {method}, expected {allowed} "
                          f"({reason})")
    if aggregation != AGGREGATION_OK:
        why = ("a median or trimmed mean has no bounded L2 sensitivity to one client"
               if mode == "central" else
               "a median or trimmed mean of noisy replies does not average their noise down "
               "as 1/sqrt(n) and the project's DP path is the uniform mean")
        errors.append(_bad("fl.aggregation", aggregation, f"'mean' with privacy.mode={mode} ({why})"))
    if weighting != "uniform":
        errors.append(_bad("fl.weighting", weighting,
                           f"'uniform' with privacy.mode={mode} (data-size weights p_c use each "
                           "client's unprotected example count and let one client's share of "
                           "the mean exceed 1/n)"))
    if reject_norm_multiple != 0:
        errors.append(_bad("fl.reject_norm_multiple", reject_norm_multiple,
                           f"0 with privacy.mode={mode} (clipping already bounds each update; "
                           "rejecting by norm makes inclusion depend on one client's data)"))
    uses_counts = method in ("ubsmoe", "a3smoe") if method_uses_counts is None else method_uses_counts
    if uses_counts and privacy.counts_noise_multiplier == 0:
        errors.append(_bad("privacy.counts_noise_multiplier", privacy.counts_noise_multiplier,
                           f"a number > 0 with method {method} (its server step uses the "
                           "clients' expert counts, which DP withholds at 0)"))
    return errors


# ---------------------------------------------------------------------------- groups


def param_group(name: str) -> str:
    """The privacy group of an adapter tensor name.

    Returns:
        ``experts`` (per-expert LoRA ``...gate_up_lora.A/B``, ``...down_lora.A/B``),
        ``router`` (``...router_weight``), ``phi`` (DMR's ``...phi``) or ``shared``
        (every other adapter tensor, e.g. attention LoRA). The patterns are those of
        ``ubsmoe.methods.base`` (EXPERT_PARAM_RE, ROUTER_PARAM_RE, PHI_PARAM_RE).
    """
    if name.endswith(_EXPERT_SUFFIXES):
        return "experts"
    if name.endswith(".router_weight"):
        return "router"
    if name.endswith(".phi"):
        return "phi"
    return "shared"


def select_groups(names: Sequence[str], groups: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split adapter names into privatised and public ones.

    Args:
        names: adapter tensor names.
        groups: ``["all"]`` or a subset of :data:`GROUPS`.

    Returns:
        ``(private, public)`` name lists, each in the order of ``names``.
    """
    if list(groups) == ["all"]:
        return list(names), []
    chosen = set(groups)
    private = [n for n in names if param_group(n) in chosen]
    public = [n for n in names if param_group(n) not in chosen]
    return private, public


# ---------------------------------------------------------------------------- generators


def noise_generator(seed: int | None, *keys: int) -> torch.Generator:
    """A CPU generator for DP noise, one per (run, round, client) key.

    Args:
        seed: ``privacy.noise_seed``; None draws a fresh secret seed from the OS
            (:mod:`secrets`), so the noise cannot be regenerated by anyone.
        keys: integers that separate streams, e.g. ``(round_idx, client_id)``; the
            server's central noise uses ``(round_idx, -1)`` by convention.

    Returns:
        A seeded ``torch.Generator`` (Mersenne Twister: statistically sound, not a
        cryptographic generator; see docs/privacy.md).
    """
    if seed is None:
        value = secrets.randbits(63)
    else:
        digest = hashlib.sha256(",".join(str(int(k)) for k in (seed, *keys)).encode()).digest()
        value = int.from_bytes(digest[:8], "little") >> 1  # 63 bits
    g = torch.Generator(device="cpu")
    g.manual_seed(value)
    return g


# ---------------------------------------------------------------------------- updates


def _global_norm(tensors: Mapping[str, torch.Tensor]) -> float:
    """L2 norm over every entry of every tensor (float64 sums)."""
    total = 0.0
    for name, t in tensors.items():
        sq = float(t.detach().to(torch.float64).pow(2).sum())
        if not math.isfinite(sq):
            raise ValueError(f"clip: tensor {name!r} holds a non-finite value (nan or inf)")
        total += sq
    return math.sqrt(total)


def clip_update(delta: Mapping[str, torch.Tensor], clipping_norm: float
                ) -> tuple[dict[str, torch.Tensor], float, float]:
    """Clip one client's update to L2 norm C over all its tensors together.

    ``delta_c <- delta_c * min(1, C / ||delta_c||)`` with ``||.||`` the L2 norm of
    all entries of all tensors concatenated (DP-FedAvg's flat clipping).

    Args:
        delta: name -> update tensor ``x_c - x_sent`` (any shapes, real dtypes), only
            the privatised groups.
        clipping_norm: C > 0; ``inf`` never clips.

    Returns:
        ``(clipped, scale, norm)``: the clipped tensors (each in its input's dtype
        and device; the input tensors themselves when ``scale == 1``), the factor
        ``min(1, C / norm)`` applied, and the norm before clipping. The scaling is
        done in float64 and cast back, so the clipped norm is C up to that cast's
        rounding (relative 1e-7 in float32).

    Raises:
        ValueError: ``clipping_norm`` not > 0, or a non-finite entry.
    """
    if not clipping_norm > 0:
        raise ValueError(f"clip_update: clipping_norm got {clipping_norm!r}, expected a number > 0")
    norm = _global_norm(delta)
    if norm <= clipping_norm:
        return dict(delta), 1.0, norm
    scale = clipping_norm / norm
    clipped = {n: (t.detach().to(torch.float64) * scale).to(t.dtype) for n, t in delta.items()}
    return clipped, scale, norm


def noise_std_on_mean(mode: str, noise_multiplier: float, clipping_norm: float,
                      num_clients: int) -> float:
    """Per-coordinate noise standard deviation on the uniform mean of n clipped updates.

    Central: ``sigma * C / n`` (one draw of ``sigma * C`` on the sum). Local: each of
    the n updates carries ``sigma * C``, so ``sigma * C / sqrt(n)`` on the mean.

    Raises:
        ValueError: unknown ``mode`` or ``num_clients < 1``.
    """
    if num_clients < 1:
        raise ValueError(f"noise_std_on_mean: num_clients got {num_clients!r}, expected >= 1")
    if mode == "off" or noise_multiplier == 0:
        return 0.0
    if mode == "central":
        return noise_multiplier * clipping_norm / num_clients
    if mode == "local":
        return noise_multiplier * clipping_norm / math.sqrt(num_clients)
    raise ValueError(f"noise_std_on_mean: mode got {mode!r}, expected one of {', '.join(MODES)}")


def add_gaussian_noise(aggregate: Mapping[str, torch.Tensor], noise_multiplier: float,
                       clipping_norm: float, num_clients: int, generator: torch.Generator,
                       reduction: str = "mean") -> dict[str, torch.Tensor]:
    """Central DP: add ``N(0, (sigma C)^2)`` to the sum of clipped updates, per coordinate.

    On the uniform mean of ``num_clients`` updates the same noise is ``sigma C / n``.
    Tensors are visited in sorted name order, so the draws depend only on the
    generator's seed and the names and shapes, not on dict order.

    Args:
        aggregate: name -> the sum or the uniform mean of the clipped updates.
        noise_multiplier: sigma >= 0; 0 returns the input tensors unchanged.
        clipping_norm: C > 0 the updates were clipped to (finite when sigma > 0).
        num_clients: n >= 1, the number of updates in the mean (the replies; it
            does not depend on any client's data).
        generator: CPU generator (:func:`noise_generator`).
        reduction: ``mean`` (std ``sigma C / n``) or ``sum`` (std ``sigma C``).

    Returns:
        name -> noisy tensor in the input's dtype and device (noise drawn and added
        in float64 on the CPU).

    Raises:
        ValueError: negative sigma, sigma > 0 with a non-finite C, n < 1 or an
            unknown reduction.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"add_gaussian_noise: reduction got {reduction!r}, expected mean or sum")
    if num_clients < 1:
        raise ValueError(f"add_gaussian_noise: num_clients got {num_clients!r}, expected >= 1")
    if not noise_multiplier >= 0:
        raise ValueError(f"add_gaussian_noise: noise_multiplier got {noise_multiplier!r}, "
                         "expected >= 0")
    if noise_multiplier == 0:
        return dict(aggregate)
    if not (math.isfinite(clipping_norm) and clipping_norm > 0):
        raise ValueError(f"add_gaussian_noise: clipping_norm got {clipping_norm!r}, "
                         "expected a finite number > 0 when noise_multiplier > 0")
    std = noise_multiplier * clipping_norm / (num_clients if reduction == "mean" else 1)
    return _add_noise(aggregate, std, generator)


def _add_noise(tensors: Mapping[str, torch.Tensor], std: float,
               generator: torch.Generator) -> dict[str, torch.Tensor]:
    """``t + N(0, std^2)`` per entry, names in sorted order, float64 on the CPU."""
    out = dict(tensors)
    for name in sorted(tensors):
        t = tensors[name]
        noise = torch.randn(t.shape, generator=generator, dtype=torch.float64) * std
        out[name] = (t.detach().to("cpu", torch.float64) + noise).to(t.device, t.dtype)
    return out


def privatise_local(delta: Mapping[str, torch.Tensor], clipping_norm: float,
                    noise_multiplier: float, generator: torch.Generator
                    ) -> tuple[dict[str, torch.Tensor], float, float]:
    """Local DP: a client clips its own update to C and adds ``N(0, (sigma C)^2)``.

    Args:
        delta: name -> update tensor ``x_c - x_sent`` of the privatised groups.
        clipping_norm: C > 0 (``inf`` only with sigma 0).
        noise_multiplier: sigma >= 0.
        generator: the client's generator (:func:`noise_generator` with
            ``(round_idx, client_id)``).

    Returns:
        ``(noisy, scale, norm)``: the released tensors and :func:`clip_update`'s
        scale and pre-clipping norm (kept on the client: the norm is private).
    """
    clipped, scale, norm = clip_update(delta, clipping_norm)
    noisy = add_gaussian_noise(clipped, noise_multiplier, clipping_norm, 1, generator, "sum")
    return noisy, scale, norm


def signal_to_noise(mean_update_norm: float, noise_std: float, num_coordinates: int) -> float:
    """Ratio of the clean mean update's L2 norm to the noise vector's expected L2 norm.

    The noise of per-coordinate std s on d coordinates has L2 norm about
    ``s * sqrt(d)`` (exactly so in expectation of its square). Example (issue 25):
    sigma 3, C 1, n 8 central: s = 0.375; d = 0.6 M gives a noise norm of about 290
    against a mean update norm of at most C = 1, so SNR <= 0.0034.

    Args:
        mean_update_norm: ``||mean_c clip(delta_c)||`` (<= C), before noise.
        noise_std: per-coordinate std on the mean (:func:`noise_std_on_mean`).
        num_coordinates: d, the privatised coordinates.

    Returns:
        The ratio (``inf`` when ``noise_std == 0``).
    """
    if num_coordinates < 1:
        raise ValueError(f"signal_to_noise: num_coordinates got {num_coordinates!r}, expected >= 1")
    if noise_std == 0:
        return math.inf
    return mean_update_norm / (noise_std * math.sqrt(num_coordinates))


# ---------------------------------------------------------------------------- counts


def counts_histogram(expert_counts: torch.Tensor, token_counts: torch.Tensor) -> torch.Tensor:
    """One client's utilization histogram ``h_{l,i} = a_{l,i} / n_l``.

    Each token is routed to K_c distinct experts, so ``0 <= a_{l,i} <= n_l``:
    every entry is in [0, 1] and a row sums to K_c (0 for a layer with n_l = 0). With
    uniform client weights the mean of the clients' h is DMR's global utilization
    ``u~`` (:func:`ubsmoe.core.routing.global_utilization`) and h is what A3SMoE's
    frequency ``f_{c,i}`` divides by n_c.

    Args:
        expert_counts: ``[L, E]`` tokens routed to each expert per SMoE layer.
        token_counts: ``[L]`` tokens processed per SMoE layer.

    Returns:
        ``[L, E]`` float64.

    Raises:
        ValueError: shapes that do not match or negative counts.
    """
    if expert_counts.dim() != 2 or token_counts.shape != expert_counts.shape[:1]:
        raise ValueError(f"counts_histogram: got expert_counts {tuple(expert_counts.shape)} and "
                         f"token_counts {tuple(token_counts.shape)}, expected [L, E] and [L]")
    a = expert_counts.detach().to(torch.float64)  # [L, E]
    n = token_counts.detach().to(torch.float64)  # [L]
    if bool((a < 0).any()) or bool((n < 0).any()):
        raise ValueError("counts_histogram: negative counts")
    h = a / n.clamp_min(1.0).unsqueeze(-1)  # [L, E]
    return torch.where((n > 0).unsqueeze(-1), h, torch.zeros_like(h))  # [L, E]


def counts_sensitivity(num_layers: int, max_top_k: int) -> float:
    """L2 bound of one client's histogram, ``sqrt(L * K_max)``.

    A row of :func:`counts_histogram` has entries in [0, 1] summing to K_c, so its
    squared norm is at most ``sum_i h_i * max_i h_i <= K_c`` (reached when K_c
    experts take every token); over L layers ``||h||_2 <= sqrt(L * K_c) <=
    sqrt(L * K_max)``, K_max being the largest top-k any client may run (public,
    from the budget levels). Adding or removing one client moves the sum of
    histograms by at most this much.

    Raises:
        ValueError: ``num_layers`` or ``max_top_k`` < 1.
    """
    if num_layers < 1 or max_top_k < 1:
        raise ValueError(f"counts_sensitivity: got num_layers={num_layers!r}, "
                         f"max_top_k={max_top_k!r}, expected integers >= 1")
    return math.sqrt(num_layers * max_top_k)


def clip_counts(histogram: torch.Tensor, bound: float) -> tuple[torch.Tensor, float]:
    """Enforce ``||h||_2 <= bound`` (a no-op for honest counts at the true bound).

    Clipping makes the sensitivity hold whatever a client reports (a bug, or a
    token counted twice), so the guarantee does not rest on the counting code.

    Args:
        histogram: ``[L, E]`` float64 from :func:`counts_histogram`.
        bound: :func:`counts_sensitivity`.

    Returns:
        ``(clipped [L, E], scale)``.
    """
    clipped, scale, _ = clip_update({"h": histogram}, bound)
    return clipped["h"], scale


def noise_counts(histograms: torch.Tensor, noise_multiplier: float, bound: float,
                 num_clients: int, generator: torch.Generator, reduction: str = "mean",
                 clamp_nonnegative: bool = False) -> torch.Tensor:
    """Gaussian noise of std ``sigma_k * bound`` on the sum of clipped histograms.

    Central: pass the sum (``reduction="sum"``) or the uniform mean of the round's
    clipped histograms (std ``sigma_k * bound / n``). Local: one client's own
    clipped histogram with ``num_clients=1``.

    Args:
        histograms: ``[L, E]`` float64, sum or mean of :func:`clip_counts` outputs.
        noise_multiplier: sigma_k >= 0 (``privacy.counts_noise_multiplier``).
        bound: the clipping bound (:func:`counts_sensitivity`).
        num_clients: n >= 1 in the mean.
        generator: CPU generator.
        reduction: ``mean`` or ``sum``.
        clamp_nonnegative: clamp the noisy result at 0 (post-processing, costs no
            privacy; DMR's :func:`ubsmoe.core.routing.server_phi_update` refuses negative
            utilization).

    Returns:
        ``[L, E]`` float64.
    """
    out = add_gaussian_noise({"h": histograms}, noise_multiplier, bound, num_clients,
                             generator, reduction)["h"]
    return out.clamp_min(0.0) if clamp_nonnegative else out


# ---------------------------------------------------------------------------- accounting


def combined_noise_multiplier(*multipliers: float) -> float:
    """One Gaussian mechanism equivalent to several released together on the same sample.

    Releasing ``f_j(D) + N(0, (sigma_j S_j)^2)`` for each j, with f_j of sensitivity
    S_j, is (after rescaling each part by ``1 / (sigma_j S_j)``) one Gaussian
    mechanism with unit noise and sensitivity ``sqrt(sum_j sigma_j^-2)``, i.e. noise
    multiplier ``(sum_j sigma_j^-2)^-1/2``. A zero multiplier gives 0 (no privacy).

    Raises:
        ValueError: no multipliers or a negative one.
    """
    if not multipliers or any(not m >= 0 for m in multipliers):
        raise ValueError(f"combined_noise_multiplier: got {multipliers!r}, expected numbers >= 0")
    if any(m == 0 for m in multipliers):
        return 0.0
    return 1.0 / math.sqrt(sum(m ** -2 for m in multipliers))


class PrivacyAccountant:
    """Epsilon per round and cumulative at delta, over the update and counts mechanisms.

    Backed by Opacus's :class:`opacus.accountants.RDPAccountant` (sampled Gaussian
    mechanism, add/remove-one-client neighbours, Poisson sampling at rate q). Each
    round composes one step with the combined noise multiplier of the mechanisms the
    round releases (:func:`combined_noise_multiplier`):

    * ``central``: multipliers ``sigma`` (update, sensitivity C) and ``sigma_k``
      (counts, sensitivity :func:`counts_sensitivity`), sampling rate q =
      ``fl.fraction``. The project samples a fixed number ``round(q N)`` of
      clients; Poisson sampling at q is the usual DP-FedAvg approximation of it
      (exact at q = 1).
    * ``local``: a client's own release must hide any change of its data, which
      can move its clipped update by 2C and its clipped histogram by 2 bound, so
      the multipliers are halved; no amplification (the server knows who took
      part: q = 1), and every round counts (an upper bound on one client's
      participations).

    Args:
        mode: ``central`` or ``local``.
        noise_multiplier: sigma of the updates.
        counts_noise_multiplier: sigma_k of the counts, or None when the counts are
            not released under DP.
        sample_rate: q in (0, 1] (ignored in local mode).
        delta: delta in (0, 1).

    Raises:
        ValueError: an unknown mode or an out-of-range argument.
    """

    def __init__(self, mode: str, noise_multiplier: float, counts_noise_multiplier: float | None,
                 sample_rate: float, delta: float) -> None:
        if mode not in ("central", "local"):
            raise ValueError(f"PrivacyAccountant: mode got {mode!r}, expected central or local")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"PrivacyAccountant: sample_rate got {sample_rate!r}, expected (0, 1]")
        if not 0 < delta < 1:
            raise ValueError(f"PrivacyAccountant: delta got {delta!r}, expected (0, 1)")
        from opacus.accountants import RDPAccountant

        self.mode = mode
        self.delta = float(delta)
        self.sample_rate = float(sample_rate) if mode == "central" else 1.0
        factor = 1.0 if mode == "central" else 0.5
        parts = [noise_multiplier] + ([] if counts_noise_multiplier is None
                                      else [counts_noise_multiplier])
        self.noise_multiplier = combined_noise_multiplier(*(factor * m for m in parts))
        self.rounds = 0
        self._rdp = RDPAccountant()

    @classmethod
    def from_config(cls, privacy: PrivacyConfig, sample_rate: float,
                    counts_released: bool) -> PrivacyAccountant:
        """The accountant of a run: ``sample_rate`` = ``fl.fraction``."""
        counts = privacy.counts_noise_multiplier if counts_released else None
        return cls(privacy.mode, privacy.noise_multiplier, counts, sample_rate, privacy.delta)

    def step(self) -> dict[str, float]:
        """Record one round's releases.

        Returns:
            ``{"epsilon": cumulative, "epsilon_round": one round alone, "delta",
            "noise_multiplier": combined, "sample_rate", "rounds"}``.
        """
        self.rounds += 1
        if self.noise_multiplier > 0:
            self._rdp.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        return self.spent()

    def spent(self) -> dict[str, float]:
        """The same record as :meth:`step` returns, without composing a round."""
        return {"epsilon": self.epsilon(), "epsilon_round": self.epsilon_round(),
                "delta": self.delta, "noise_multiplier": self.noise_multiplier,
                "sample_rate": self.sample_rate, "rounds": float(self.rounds)}

    def epsilon(self) -> float:
        """Cumulative epsilon at ``delta`` over the rounds so far (0 before any; inf without noise)."""
        if self.rounds == 0:
            return 0.0
        if self.noise_multiplier == 0:
            return math.inf
        return float(self._rdp.get_epsilon(delta=self.delta))

    def epsilon_round(self) -> float:
        """Epsilon at ``delta`` of a single round alone (inf without noise)."""
        if self.noise_multiplier == 0:
            return math.inf
        from opacus.accountants import RDPAccountant

        one = RDPAccountant()
        one.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        return float(one.get_epsilon(delta=self.delta))

    def state_dict(self) -> dict[str, Any]:
        """For resume: the settings and the number of rounds composed."""
        return {"mode": self.mode, "noise_multiplier": self.noise_multiplier,
                "sample_rate": self.sample_rate, "delta": self.delta, "rounds": self.rounds}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; the settings must match this accountant's.

        Raises:
            ValueError: a setting differs (resuming under other privacy settings
                would make the reported epsilon wrong).
        """
        for key in ("mode", "noise_multiplier", "sample_rate", "delta"):
            if state[key] != getattr(self, key):
                raise ValueError(f"privacy accountant state: {key} got {state[key]!r}, "
                                 f"expected this run's {getattr(self, key)!r}")
        from opacus.accountants import RDPAccountant

        self._rdp = RDPAccountant()
        self.rounds = int(state["rounds"])
        if self.noise_multiplier > 0:
            for _ in range(self.rounds):
                self._rdp.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)


def calibrate_noise_multiplier(target_epsilon: float, delta: float, rounds: int,
                               sample_rate: float) -> float:
    """The combined noise multiplier that reaches ``target_epsilon`` after ``rounds`` (Opacus RDP).

    Example (issue 25): 20 rounds, q = 1, epsilon 8, delta 1e-5 give about 2.85.
    Split it between updates and counts with :func:`combined_noise_multiplier`.
    """
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                      sample_rate=sample_rate, steps=rounds, accountant="rdp"))

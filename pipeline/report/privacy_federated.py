"""The privacy section of a federated run: threat model, privacy levels (sample / user), secure aggregation,
where the noise is added, and what the guarantee does not cover (issue 14).

:func:`federated_privacy` rewrites the section :func:`pipeline.report.privacy.privacy_section` built.
"""

from __future__ import annotations

from typing import Any, Mapping

from auditml_core.config import Config
from auditml_core.models import MODELS, title
from pipeline.report.fmt import number
from pipeline.report.privacy import CLIENT_LEVEL_NOT_CLAIMED, eps_delta

_THREAT_BASE = (
    "Threat model: an honest-but-curious server (it follows the protocol but reads everything it receives) and "
    "anyone who later sees the released model, metrics or explanations."
)
_NO_SECAGG = "Secure aggregation is not used: the server sees each participating client's model update in the clear."
_SAMPLE_LEVEL_ON_CLIENTS = (
    "Sample-level DP-SGD on each client: protects each training record of a client from the server and from "
    "anyone who sees the released models, since every update a client sends is already DP-SGD output."
)


def _training(trained: Any, name: str) -> Mapping[str, Any]:
    """A model's training record ({} when there is none)."""
    return trained.models[name].training or {}


def _recorded(trained: Any, key: str) -> dict[str, Any]:
    """The models whose training record has a non-empty ``key``, in model order: {model: that value}."""
    values = {name: trained.models[name].training.get(key) for name in MODELS}
    return {k: v for k, v in values.items() if v}


def _levels(user: Mapping[str, Any], section: Mapping[str, Any], *, sample_on: bool) -> list[dict[str, Any]]:
    """Every (ε, δ) of the run with its unit of privacy: user level per model, then sample level when on."""
    levels = [
        {
            "model": name,
            "level": "user",
            "unit_of_privacy": rec.get("unit_of_privacy"),
            "epsilon": rec.get("epsilon"),
            "delta": rec.get("delta"),
            "noise_multiplier": rec.get("noise_multiplier"),
            "clipping_norm": rec.get("clipping_norm"),
            "sample_rate": rec.get("sample_rate"),
            "rounds": rec.get("completed_rounds"),
            "accountant": rec.get("accountant"),
            "independent_check": rec.get("independent_check"),
            "noise_placement": rec.get("noise_placement", "server"),
            "delta_accountant": rec.get("delta_accountant", rec.get("delta")),
            "delta_clip": rec.get("delta_clip", 0.0),
            "known_sample": rec.get("known_sample"),
        }
        for name, rec in user.items()
    ]
    if sample_on:
        levels += [
            {
                "model": name,
                "level": "sample",
                "unit_of_privacy": rec.get("unit_of_privacy"),
                "epsilon": rec.get("epsilon"),
                "delta": rec.get("delta"),
            }
            for name, rec in (section.get("models") or {}).items()
            if rec
        ]
    return levels


def _level_line(level: Mapping[str, Any]) -> str:
    """One level for the statement: model, level, (ε, δ) (δ split when a SecAgg+ clip adds to it), unit."""
    split = (
        f": the accountant's {number(level['delta_accountant'], 3)} plus {number(level['delta_clip'], 3)} for a "
        "SecAgg+ clip"
        if level.get("delta_clip")
        else ""
    )
    return (
        f"{title(level['model'])}: {level['level']}-level ({eps_delta(level['epsilon'], level['delta'])}{split}), "
        f"unit of privacy: {level['unit_of_privacy']}"
    )


def _secagg_view(noise_placements: set[str]) -> tuple[str, str, str]:
    """(what the server learns, what it sees, how SecAgg+'s range is kept) for uploads that are plain model
    weights (no user-level DP: empty ``noise_placements``) or clipped updates noised by the server or the clients."""
    if not noise_placements:
        return (
            "the weighted average of the clients that completed a round",
            "the average (the global model) is seen by the server and released",
            "a round in which any uploaded coordinate would be clipped fails instead of being released",
        )
    # Under user-level DP the uploads are clipped updates (weight 1) and the release is their noisy sum over q·N
    # (federated/app/secagg.py): the server unmasks a sum, not the global model.
    noised = noise_placements == {"client"}
    learns = "the sum of the clipped model updates of the clients that completed a round" + (
        " (each already carrying its client's noise)" if noised else ""
    )
    seen = (
        "that sum is seen by the server"
        + ("" if noised else " without noise")
        + "; the released global model adds it"
        + ("" if noised else ", plus the server's DP noise,")
        + " over q·N to the previous one"
    )
    clip_note = (
        "a client refuses an upload with any coordinate outside it, so nothing is clipped; each client "
        "reports whether its update was clipped to C (dp-clipped in the record)"
        if noised
        else "a client's update is clipped to C less the rounding slack, so its coordinates lie inside it; "
        "each client reports whether its update was clipped (dp-clipped in the record)"
    )
    return learns, seen, clip_note


def _secagg_threat(secagg: Mapping[str, Any], user: Mapping[str, Any]) -> str:
    """What SecAgg+ hides from the server, and from whom it does not (issue 14; federated/app/secagg.py)."""
    sa = next(iter(secagg.values()))
    placements = {
        (user.get(n) or {}).get("noise_placement", "server") for n in secagg if "uploads" in (secagg[n] or {})
    }
    learns, seen, clip_note = _secagg_view(placements)
    return (
        f"Secure aggregation (SecAgg+, for {', '.join(title(n) for n in secagg)}): each client masks its upload, so "
        f"the server learns only {learns}, never one client's "
        f"model or update, unless it colludes with at least {sa.get('reconstruction_threshold')} of that client's "
        f"{sa.get('num_shares')} key-share holders. It hides individual updates from the server only: {seen}. "
        "The server relays the clients' public keys, so "
        "this holds against an honest-but-curious server, not an actively malicious one. SecAgg+'s range is "
        f"±{number(sa.get('clipping_range'), 4)}, quantised in steps of {number(sa.get('quantization_step'), 3)} "
        f"({clip_note})."
    )


def _client_noise_threat(name: str, rec: Mapping[str, Any]) -> str:
    """User-level DP with the noise added by the clients under SecAgg+ (auditml_core/privacy/client_noise.py)."""
    cn, ks = rec.get("client_noise") or {}, rec.get("known_sample") or {}
    return (
        f"User-level DP for {title(name)} (DP-FedAvg, noise added by the clients under SecAgg+): every client adds "
        f"Gaussian noise of std {number(cn.get('noise_std'), 4)} (σ·C/√t, t = {cn.get('min_survivors')}) to its "
        "clipped update (a zero update when not sampled) before masking, and the server unmasks a round only "
        f"when at least t uploads arrived, so the server never holds a sum with noise below σ·C = "
        f"{number((rec.get('noise_multiplier') or 0) * (rec.get('clipping_norm') or 0), 4)}. Against the "
        "server, which draws the sample and knows who took part, sampling does not amplify: a client is "
        f"protected at ε = {number(ks.get('epsilon'), 4)} (σ over the at most {ks.get('max_participations')} "
        f"rounds it took part in); the ε = {number(rec.get('epsilon'), 4)} with sampling holds against whoever "
        "sees only the released models. This assumes no client hands its noise to the server and that "
        "dropping out does not depend on a client's data or on its being sampled."
    )


def _server_noise_threat(*, secagg: bool) -> str:
    """User-level DP with the noise added by the server: nothing protects a client from the server itself."""
    return (
        "User-level DP (DP-FedAvg, noise added by the server): protects a whole client's data from whoever sees "
        "the released global models (every round's model, the final weights and everything computed from them). "
        + (
            "It does NOT protect a client from the server itself, which adds the noise after receiving the "
            "un-noised aggregate of the clients' updates (secure aggregation hides the individual ones). Under "
            "secure aggregation each client clips its own update (the server cannot): the bound C holds for "
            "clients that follow the protocol."
            if secagg
            else "It does NOT protect a client from the server itself, which receives the un-noised individual updates."
        )
    )


def _threat_model(
    user: Mapping[str, Any], secagg: Mapping[str, Any], client_noise: Mapping[str, Any], *, sample_on: bool
) -> list[str]:
    """Who is trusted with what, and what DP hides from whom at each level that is on."""
    threat = [_THREAT_BASE, _secagg_threat(secagg, user) if secagg else _NO_SECAGG]
    threat += [_client_noise_threat(name, rec) for name, rec in client_noise.items()]
    if set(user) - set(client_noise):
        threat.append(_server_noise_threat(secagg=bool(secagg)))
    if sample_on:
        threat.append(_SAMPLE_LEVEL_ON_CLIENTS)
    return threat


def _reported_metrics(trained: Any) -> list[str]:
    """What the clients reported in the clear, read from the record (not from what the code should send)."""
    return sorted(
        {
            key
            for name in MODELS
            for r in _training(trained, name).get("client_rounds") or []
            for c in r.get("trained") or []
            for key in c
            if key not in ("node_id", "partition-id", "privacy")
        }
    )


def _federated_not_covered(
    trained: Any, user: Mapping[str, Any], secagg: Mapping[str, Any], client_noise: Mapping[str, Any]
) -> list[str]:
    """What neither level covers: participation, public choices, a known sample, SecAgg+'s rounding and collusion,
    what the sites told the server, and the server's own view."""
    reported = _reported_metrics(trained)
    not_covered = [
        "participation: which clients took part in which round, how many, and their reported metrics ("
        + (", ".join(reported) if reported else "loss, num-examples, seconds")
        + ") reach the server and the record in the clear",
        "the number of rounds, the model architecture and the hyper-parameters are public choices, not protected",
    ]
    for name, rec in user.items():
        ks = rec.get("known_sample")
        if ks and rec.get("sample_rate", 1) < 1:
            not_covered.append(
                f"{title(name)}: which clients were sampled in which round (the server draws it; the record lists "
                "it): the user-level ε with sampling holds only against an observer who does not know it; against "
                f"the server and anyone holding the run directory a client has ε = {number(ks.get('epsilon'), 4)} "
                f"(δ = {number(ks.get('delta'), 3)}) over the at most {ks.get('max_participations')} rounds it took "
                "part in"
            )
    for name in client_noise:
        sa = _training(trained, name).get("secure_aggregation") or {}
        not_covered.append(
            f"{title(name)}: SecAgg+'s stochastic rounding of each noised upload (step "
            f"{number(sa.get('quantization_step'), 3)}, numpy's global generator): the server sees the sum of the "
            "rounded uploads, which depends on each upload beyond the sum by less than one step per coordinate; "
            "the Gaussian analysis does not cover it"
        )
        not_covered.append(
            f"{title(name)}: collusion: a client that gives its noise to the server lowers the noise the server "
            "faces; clients' row counts and seconds reach the server in the clear"
        )
    for name in MODELS:  # per-site data (federated/app/site.py): what the sites told the server in the clear
        sites = _training(trained, name).get("sites")
        if sites:
            not_covered += [f"{title(name)}, per-site data: {line}" for line in sites.get("not_dp_protected", [])]
    not_covered.append(
        "the server's view of each round's sum: it carries the clients' noise, so it is covered only at the "
        "un-amplified ε stated for the server (the known-sample line above)"
        if secagg and client_noise and set(client_noise) >= set(secagg)
        else "the server's view of the aggregate of each round (secure aggregation hides only the individual updates)"
        if secagg
        else "the server's view of individual client updates (no secure aggregation)"
    )
    return not_covered


def _user_level_caveats(name: str, rec: Mapping[str, Any]) -> list[str]:
    """A model's user-level ε with its accounting and independent check, and a warning when the noise drowns it."""
    chk = rec.get("independent_check") or {}
    caveats = [
        f"{title(name)}: user-level ε = {number(rec.get('epsilon'), 4)} after {rec.get('completed_rounds')} "
        f"rounds (σ = {number(rec.get('noise_multiplier'), 4)}, C = {number(rec.get('clipping_norm'), 3)}, "
        f"q = {number(rec.get('sample_rate'), 3)}, {str(rec.get('accountant', '?')).upper()}; "
        f"{rec.get('sampling')}); "
        + (
            f"dp-accounting recomputes PLD ε = {number(chk.get('pld_epsilon'), 4)}, RDP ε = "
            f"{number(chk.get('rdp_epsilon'), 4)} ({'agrees' if chk.get('agrees') else 'DISAGREES'})."
            if chk
            else "NOT independently checked (the record has no independent_check)."
        )
    ]
    noise = rec.get("aggregate_noise") or {}
    if noise.get("dominated"):  # auditml_core.privacy.user_level.aggregate_noise
        caveats.append(
            f"{title(name)}: user-level DP noise drowns the model: noise-to-signal "
            f"{number(noise['noise_to_signal'], 3)} >= 1 ({noise['formula']}; {noise['n_parameters']} weights, "
            f"N = {rec.get('n_clients')} clients, noise std {number(noise['noise_std_per_weight'], 3)} per "
            f"weight and round): the noise moves the weights farther than all the clients together can, so "
            "the model is far below its non-private quality, possibly at chance; it would need about "
            f"{noise['clients_needed']} clients at this ε, a larger ε or a smaller model."
        )
    return caveats


def _server_sees(user: Mapping[str, Any], secagg: Mapping[str, Any], client_noise: Mapping[str, Any]) -> str:
    """What the server sees of each round when user-level DP is the only level."""
    if client_noise and set(client_noise) == set(user):
        return (
            "the server sees only the sum of the clients' noised uploads (client-side noise under secure "
            "aggregation; against the server sampling does not amplify)"
        )
    if secagg:
        return "the server sees the un-noised aggregate of each round (secure aggregation hides individual updates)"
    return "the server sees every client's update in the clear"


def _user_level_only(section: dict[str, Any], lines: list[str], server_sees: str) -> None:
    """Rewrite ``section`` (in place) for user-level DP without sample-level DP: the user-level guarantee is the
    whole claim, and the DP-off lines of :func:`privacy_section` are replaced."""
    section["caveats"] = [c for c in section.get("caveats", []) if not c.startswith("DP is off:")] + [
        "Sample-level DP is off (dp.enabled = false): only the user-level guarantee above holds; a record is "
        f"protected only as part of its client's data, in the released models, and {server_sees}."
    ]
    section["enabled"] = True
    section["statement"] = (
        "User-level differential privacy (DP-FedAvg) protects a whole client's data in the released global "
        "models: " + "; ".join(lines) + ". Individual records get no separate sample-level guarantee "
        f"(dp.enabled = false), and {server_sees}."
    )
    section["covered"] = [
        "models/*.safetensors of the federated networks and every per-round global model: DP-FedAvg output",
        "predictions, metrics and explanations computed from those weights (post-processing)",
    ]
    section["not_covered"] = [
        c for c in section.get("not_covered", []) if not c.startswith("every artifact of this run")
    ] + ["models/ridge.json, data/* preprocessing statistics and data files: fitted without DP"]


def _failure_caveats(trained: Any) -> list[str]:
    """What the server logged as warnings (failed nodes, budget refusals), one line per model that had any."""
    caveats = []
    for name in MODELS:
        t = _training(trained, name)
        failed = len(t.get("failures") or [])
        refused = sum(len(r.get("refused") or []) for r in t.get("client_rounds") or [])
        if failed or refused:
            caveats.append(
                f"{title(name)}: {failed} client update(s) failed and {refused} were refused (a client whose privacy "
                f"budget was spent sends no update) over {t.get('completed_rounds')} round(s): those rounds averaged "
                f"fewer clients than were sampled (per-round detail: client_rounds in models/{name}.json)."
            )
    return caveats


def federated_privacy(section: dict[str, Any], cfg: Config, trained: Any) -> dict[str, Any]:
    """Add the federated threat model, the unit of privacy and ε, δ per level to ``section`` (returned).

    A no-op for central runs. For a federated run it states who is trusted with what
    (honest-but-curious server; with SecAgg+ it sees only the aggregate, without it every
    client's update), what DP hides from whom at each level that is on, and what neither covers.
    """
    if cfg.train.mode != "federated":
        return section
    user = _recorded(trained, "user_level_privacy")
    sample_on = bool(section.get("enabled")) and cfg.dp.enabled
    levels = _levels(user, section, sample_on=sample_on)
    secagg = _recorded(trained, "secure_aggregation")
    client_noise = {k: v for k, v in user.items() if v.get("noise_placement") == "client"}
    threat = _threat_model(user, secagg, client_noise, sample_on=sample_on)
    not_covered = _federated_not_covered(trained, user, secagg, client_noise)
    lines = [_level_line(lv) for lv in levels]
    section = dict(section)
    section["federated"] = {"threat_model": threat, "levels": levels, "not_covered": not_covered}
    if user:
        for name, rec in user.items():
            section.setdefault("caveats", []).extend(_user_level_caveats(name, rec))
        section["caveats"] = [c for c in section.get("caveats", []) if CLIENT_LEVEL_NOT_CLAIMED not in c]
        if not sample_on:
            _user_level_only(section, lines, _server_sees(user, secagg, client_noise))
        else:
            section["statement"] = (
                section["statement"]
                + " Both levels hold at once (different adjacencies; they do not add up): "
                + "; ".join(lines)
                + "."
            )
    for line in _failure_caveats(trained):
        section.setdefault("caveats", []).append(line)
    section["statement"] = section["statement"] + " " + " ".join(threat)
    section["not_covered"] = list(section.get("not_covered", [])) + not_covered
    return section

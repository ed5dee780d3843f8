"""The planner's output: a plan as an aligned text table, the ladder as one line per rung
(one table per target)."""

from __future__ import annotations

from near_jax.plan.planner import Plan


def _si(x: float, unit: str = "") -> str:
    for scale, prefix in (
        (1e24, "Y"),
        (1e21, "Z"),
        (1e18, "E"),
        (1e15, "P"),
        (1e12, "T"),
        (1e9, "G"),
        (1e6, "M"),
        (1e3, "k"),
    ):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{prefix}{unit}"
    return f"{x:.3g}{unit}"


def _count(x: float) -> str:
    return f"{x:,.1f}" if x < 100 else f"{x:,.0f}"


def _gib(x: float) -> str:
    return f"{x / 2**30:.2f} GiB" if abs(x) >= 2**30 else f"{x / 2**20:.1f} MiB"


def _secs(x: float) -> str:
    return f"{x * 1e3:.1f} ms" if x < 1 else f"{x:.2f} s"


def format_plan(p: Plan) -> str:
    """The plan as an aligned text table."""
    mesh = " ".join(f"{k}={v}" for k, v in p.mesh.items())
    mem, t = p.memory, p.time
    rows = [
        ("config", f"{p.name} on {p.devices} x {p.hardware} ({mesh}), attention {p.attention}"),
        (
            "params",
            f"{_si(p.params['total'])} total, {_si(p.params['embedding'])} embedding, "
            f"{_si(p.params['non_embedding'])} non-embedding",
        ),
        ("train FLOPs/token", _si(p.flops_per_token)),
        ("tokens/step", _si(p.tokens_per_step)),
    ]
    for key in ("params", "optimizer", "grads", "batch", "activations"):
        rows.append((f"memory: {key}", _gib(mem[key])))
    rows.append(
        (
            "  residuals | head | layer",
            f"{_gib(mem['residuals'])} | {_gib(mem['head_phase'])} | {_gib(mem['layer_phase'])}",
        )
    )
    verdict = "n/a" if p.fits is None else "fits" if p.fits else "DOES NOT FIT"
    hbm = f" of {_gib(p.hbm_bytes)} HBM" if p.hbm_bytes else ""
    rows.append(("memory: total/device", f"{_gib(mem['total'])}{hbm}: {verdict}"))
    if "step_s" in t:
        rows.append(
            (
                "step time bound",
                f"{_secs(t['step_s'])} (compute {_secs(t['compute_s'])},"
                f" HBM {_secs(t['hbm_s'])}, ICI {_secs(t['ici_s'])}, DCN {_secs(t['dcn_s'])})",
            )
        )
        rows.append(("MFU bound", f"{t['mfu_bound']:.1%} ({_si(t['tokens_per_s'])} tokens/s)"))
    rows.append(
        (
            "token budget",
            f"{_si(p.token_budget)} tokens = {p.steps} steps, {_si(p.train_flops)}FLOP",
        )
    )
    if p.device_days:
        rows.append(
            (
                f"at {p.mfu:.0%} MFU",
                f"{p.device_days:,.0f} device-days = {p.device_days / p.devices:,.1f} days",
            )
        )
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def format_ladder(plans: list[Plan]) -> str:
    """One line per rung: size, hardware, memory verdict, tokens, FLOPs, device-days."""
    head = (
        "rung",
        "params",
        "devices",
        "mem/device",
        "fits",
        "MFU bound",
        "tokens",
        "FLOPs",
        "device-days",
        "days",
    )
    lines = [head]
    for p in plans:
        fits = "n/a" if p.fits is None else "yes" if p.fits else "NO"
        mfu = f"{p.time['mfu_bound']:.0%}" if "mfu_bound" in p.time else "n/a"
        lines.append(
            (
                p.name,
                _si(p.params["total"]),
                f"{p.devices} {p.hardware}",
                _gib(p.memory["total"]),
                fits,
                mfu,
                _si(p.token_budget),
                _si(p.train_flops),
                _count(p.device_days),
                _count(p.device_days / p.devices),
            )
        )
    total = sum(p.device_days for p in plans)
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(head))]
    out = ["  ".join(f"{c:<{w}}" for c, w in zip(row, widths, strict=True)) for row in lines]
    mfu = plans[0].mfu if plans else 0
    out.append(
        f"total: {_si(sum(p.train_flops for p in plans))}FLOP, {total:,.0f} "
        f"device-days at {mfu:.0%} MFU"
    )
    return "\n".join(out)


def format_targets(plans: list[tuple[str, Plan]]) -> str:
    """One ladder table per target ("tpu", "gpu"), each under a heading line, in order."""
    targets = list(dict.fromkeys(t for t, _ in plans))
    return "\n\n".join(
        f"{t.upper()}:\n" + format_ladder([p for pt, p in plans if pt == t]) for t in targets
    )

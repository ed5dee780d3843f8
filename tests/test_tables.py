"""The planner's tables: aligned columns that read back as the plan they print."""

import re

import pytest

from near_jax import hardware
from near_jax.plan.planner import load_ladder, make_plan
from near_jax.plan.tables import format_ladder, format_plan

UNITS = {"MiB": 2**20, "GiB": 2**30}
SI = {"": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18, "Z": 1e21}


def _bytes(text):
    number, unit = text.split()
    return float(number) * UNITS[unit]


def _si(text):
    number, prefix = re.fullmatch(r"([0-9.]+)([kMGTPEZ]?)", text).groups()
    return float(number) * SI[prefix]


def _plans():
    cfg = load_ladder().get_config("m7b")
    return make_plan(cfg, hardware.get("v5p"), 64), make_plan(cfg, hardware.get("h100"), 64)


def test_plan_table_is_aligned_and_reads_back_as_the_plan():
    p = _plans()[0]
    lines = format_plan(p).splitlines()
    column = lines[0].index(f"{p.name} on {p.devices} x {p.hardware} (")
    for line in lines:  # every value starts in the same column, two spaces after its label
        assert line[column - 2 : column] == "  " and line[column] != " ", line
    rows = {line[:column].rstrip(): line[column:] for line in lines}
    assert len(rows) == len(lines)
    for key in ("params", "optimizer", "grads", "activations"):  # 3 significant digits
        assert _bytes(rows[f"memory: {key}"]) == pytest.approx(p.memory[key], rel=5e-3)
    total, hbm = re.fullmatch(r"(.+) of (.+) HBM: fits", rows["memory: total/device"]).groups()
    assert _bytes(total) == pytest.approx(p.memory["total"], rel=5e-3)
    assert _bytes(hbm) == pytest.approx(p.hbm_bytes, rel=5e-3)
    assert _si(rows["tokens/step"]) == pytest.approx(p.tokens_per_step, rel=5e-3)
    assert _si(rows["train FLOPs/token"]) == pytest.approx(p.flops_per_token, rel=5e-3)
    assert rows["MFU bound"].startswith(f"{p.time['mfu_bound']:.1%} (")
    assert rows[f"at {p.mfu:.0%} MFU"] == (
        f"{p.device_days:,.0f} device-days = {p.device_days / p.devices:,.1f} days"
    )


def test_ladder_has_one_aligned_line_per_rung_and_a_total():
    plans = _plans()
    lines = format_ladder(list(plans)).splitlines()
    assert len(lines) == 1 + len(plans) + 1
    header, *rows = (re.split(r" {2,}", line.rstrip()) for line in lines[:-1])
    assert header[0] == "rung" and all(len(row) == len(header) == 10 for row in rows)
    starts = [m.start() for m in re.finditer(r"(?:^|(?<=  ))\S", lines[0])]
    assert len(starts) == 10
    for line in lines[1:-1]:  # each field starts under its heading
        assert [line[s - 2 : s] == "  " and line[s] != " " for s in starts[1:]] == [True] * 9
    for p, row in zip(plans, rows, strict=True):
        assert row[0] == p.name and row[2] == f"{p.devices} {p.hardware}"
        assert _si(row[1]) == pytest.approx(p.params["total"], rel=5e-3)
        assert _bytes(row[3]) == pytest.approx(p.memory["total"], rel=5e-3)
        assert row[4] == "yes" and float(row[8].replace(",", "")) == round(p.device_days)
    total = sum(p.device_days for p in plans)
    assert lines[-1].endswith(f" {total:,.0f} device-days at {plans[0].mfu:.0%} MFU")

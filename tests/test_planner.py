"""A config's plan: the step-time bound and attention per accelerator. (The hardware table:
test_hardware.py.)"""

from near_jax import hardware
from near_jax.plan.planner import load_ladder, make_plan


def test_step_time_bound_and_attention_per_accelerator():
    cfg = load_ladder().get_config("m7b")
    p = make_plan(cfg, hardware.get("v5p"), 64)
    t = p.time
    assert t["step_s"] == max(t["compute_s"], t["hbm_s"], t["ici_s"], t["dcn_s"])
    # Full remat recomputes the forward pass: the bound is about 3/4 MFU when compute-bound.
    assert 0.7 < t["mfu_bound"] < 0.8
    assert p.fits and p.attention == "splash"
    # Across 8 H100 nodes FSDP traffic crosses InfiniBand: slower than in one TPU slice.
    gpu = make_plan(cfg, hardware.get("h100"), 64)
    assert gpu.time["ici_s"] > t["ici_s"] and gpu.attention == "cudnn"

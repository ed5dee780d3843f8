"""The analytic model: exact state shards, remat and micro-batches trading memory."""

from helpers import plan_config

from near_jax import hardware
from near_jax.plan.estimate import batch_rows, layout, memory, step_time
from near_jax.plan.planner import load_ladder, resolve


def test_state_is_sharded_by_fsdp_and_tensor_exactly():
    cfg = resolve(plan_config(mesh=dict(data=1)))
    full = memory(cfg, layout(cfg, 1))
    cfg8 = resolve(plan_config(mesh=dict(fsdp=4, tensor=2)))
    split = memory(cfg8, layout(cfg8, 8))
    # Every weight matrix splits 8 ways; only the norm scales (embed -> fsdp) split 4 ways.
    assert full["params"] / 8 < split["params"] < full["params"] / 7.9
    assert split["optimizer"] == 2 * split["params"]
    micro = resolve(plan_config(micro=2))
    lay = layout(micro, 8)
    assert memory(micro, lay)["grads"] == 2 * memory(micro, lay)["params"]


def test_remat_and_micro_batches_trade_memory_as_expected():
    lay = {"data": 8, "fsdp": 1, "tensor": 1, "dcn_data": 1, "devices": 8}
    acts = {
        r: memory(resolve(plan_config(remat=r)), lay)["activations"]
        for r in ("full", "dots_saveable", "none")
    }
    assert acts["full"] < acts["dots_saveable"] < acts["none"]
    one = memory(resolve(plan_config(batch=32)), lay)["activations"]
    four = memory(resolve(plan_config(batch=32, micro=4)), lay)["activations"]
    assert four < one / 3
    # Fused attention (TPU splash, GPU cuDNN) keeps no [length x length] scores.
    cfg = resolve(plan_config(remat="none", seq=1024, batch=8))
    assert memory(cfg, lay, "splash")["total"] < memory(cfg, lay, "xla")["total"]


def test_the_fused_loss_saves_the_m500m_rung_its_logits():
    ladder = load_ladder()
    cfg = resolve(ladder.get_config("m500m"))
    assert cfg.model.loss_chunk == 1024
    cfg.data.seq_len = 8192  # the yardstick: 0.5B at seq 8192
    lay = layout(cfg, 4)
    fused = memory(cfg, lay, "splash")
    cfg.model.loss_chunk = 0
    full = memory(cfg, lay, "splash")
    tokens = batch_rows(cfg, lay)[1] * cfg.data.seq_len
    logits_bytes = tokens * cfg.model.vocab_size * 4  # float32 [T, V] per device
    assert full["total"] - fused["total"] > logits_bytes
    assert fused["head_phase"] < full["head_phase"] / 2
    print(f"m500m seq 8192: {full['total'] / 2**30:.2f} -> {fused['total'] / 2**30:.2f} GiB")


def test_the_fused_loss_costs_a_second_logits_matmul_and_per_chunk_reduce_scatters():
    acc = hardware.get("v5p")
    cfg = resolve(plan_config(dict(vocab_size=32768, loss_chunk=512), dict(fsdp=8), seq=512))
    lay = layout(cfg, 8)
    fused = step_time(cfg, lay, acc, memory(cfg, lay))
    cfg.model.loss_chunk = 0
    full = step_time(cfg, lay, acc, memory(cfg, lay))
    tokens = cfg.train.global_batch_size * cfg.data.seq_len
    extra = fused["hardware_flops"] - full["hardware_flops"]
    assert extra == 2 * cfg.model.d_model * 32768 * tokens
    assert fused["model_flops"] == full["model_flops"]
    assert fused["ici_s"] > full["ici_s"]  # 2 rows x 256 positions: one more reduce-scatter

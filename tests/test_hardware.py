"""The accelerator table (`near_jax.hardware`): per-device numbers, aliases, the peak FLOP/s
that MFU and plans share, and unknown names."""

import pytest

from near_jax import hardware


def test_hardware_table():
    assert hardware.get("v5p").peak_flops == 459e12
    assert hardware.get("ironwood").hbm_bytes == 96 * 2**30  # per device: 2 per chip
    assert hardware.get("b200").hbm_bytes == 180e9
    with pytest.raises(ValueError, match="unknown hardware 'v9'"):
        hardware.get("v9")


def test_every_accelerator_but_cpu_has_the_peak_of_its_device_kind():
    for name, acc in hardware.HARDWARE.items():
        assert acc.name == name and hardware.get(name) is acc
        assert acc.peak_flops == hardware.PEAK_FLOPS_BF16.get(acc.device_kind, 0.0), name
        if acc.platform == "cpu":
            assert acc.peak_flops == 0.0  # no peak: MFU is not reported
        else:
            assert acc.device_kind in hardware.PEAK_FLOPS_BF16, name
            assert acc.peak_flops > 0 and acc.hbm_bytes > 0 and acc.hbm_bw > 0, name
            assert acc.domain_devices == acc.domain_chips * acc.devices_per_chip


def test_aliases_and_case_resolve_and_unknown_names_list_the_known_ones():
    for alias, name in hardware.ALIASES.items():
        assert hardware.get(alias) is hardware.HARDWARE[name]
        assert hardware.get(alias.upper()) is hardware.HARDWARE[name]
    assert hardware.get("H100") is hardware.HARDWARE["h100"]
    with pytest.raises(ValueError, match="unknown hardware 'a40'; known: .*h100.*ironwood"):
        hardware.get("a40")


def test_more_specific_device_kinds_come_before_the_keys_they_contain():
    keys = list(hardware.PEAK_FLOPS_BF16)
    for i, key in enumerate(keys):
        for later in keys[i + 1 :]:
            assert key not in later, f"{later!r} is shadowed by the earlier {key!r}"

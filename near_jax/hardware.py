"""Accelerator specs for the planner: peak bf16 FLOP/s, HBM size and bandwidth, interconnect.

One row per accelerator, per *chip* as the vendor quotes it; `Accelerator` derives the
per-JAX-device numbers the planner uses (a TPU7x chip is two JAX devices; v4 and v5p chips are
one "megacore" device each). The peak FLOP/s per device is `PEAK_FLOPS_BF16` below, which
`metrics` also reads, so MFU in training logs and in plans use the same numbers.

Interconnect: `ici_bw` is the chip's bidirectional bandwidth inside its fast domain (a TPU
slice's ICI, a GPU's NVLink domain) and `dcn_bw` the chip's share of the network between
domains (TPU data-center network, GPU InfiniBand/RoCE). `domain_chips` is the largest fast
domain: a collective over more chips than this crosses `dcn_bw`.

Sources (checked 2025): Cloud TPU system-architecture pages cloud.google.com/tpu/docs/{v4,
v5e,v5p,v6e,tpu7x}; NVIDIA datasheets for A100, H100, H200, HGX/DGX B200 and GB200 NVL72.
Numbers marked "assumed" are not published per chip; they are labelled where they are used.
"""

from __future__ import annotations

import dataclasses

GB = 1e9
GIB = 2**30

# Dense (no 2:4 sparsity) bf16 peak FLOP/s of ONE JAX device, keyed by a lowercase substring of
# `jax.Device.device_kind`. The first matching key wins (dicts keep insertion order), so a more
# specific key comes before any key it contains: "tpu v5 lite" before "tpu v5", "gb200" before
# "b200", "h100 pcie" before "h100". TPU numbers are per chip from the Cloud TPU docs
# (cloud.google.com/tpu/docs/<version>); NVIDIA numbers are the datasheet's "BF16 Tensor Core"
# figure, which NVIDIA quotes *with sparsity*, halved to the dense rate.
PEAK_FLOPS_BF16: dict[str, float] = {
    # TPU v5e: device_kind "TPU v5 lite" (older runtimes: "TPU v5e"). 197 TFLOP/s per chip.
    "tpu v5 lite": 197e12,
    "tpu v5e": 197e12,
    # TPU v5p: device_kind "TPU v5" (or "TPU v5p"); one megacore device per chip. 459 TFLOP/s.
    "tpu v5p": 459e12,
    "tpu v5": 459e12,
    # TPU v6e (Trillium): device_kind "TPU v6 lite" (or "TPU v6e"). 918 TFLOP/s per chip.
    "tpu v6 lite": 918e12,
    "tpu v6e": 918e12,
    # TPU v4: device_kind "TPU v4"; one megacore device per chip. 275 TFLOP/s per chip.
    "tpu v4": 275e12,
    # TPU7x (Ironwood): device_kind "TPU7x". 2,307 TFLOP/s per chip, but the chip's two
    # TensorCores are two JAX devices (no megacore), so each device gets half.
    "tpu7x": 2307e12 / 2,
    # NVIDIA GB200 (device_kind "NVIDIA GB200"): GB200 NVL72 datasheet, 10 PFLOP/s sparse per
    # superchip of 2 GPUs -> 2.5 PFLOP/s dense per GPU. Before "b200", which it contains.
    "gb200": 2.5e15,
    # NVIDIA B200 (device_kind "NVIDIA B200"): HGX B200 datasheet, 36 PFLOP/s sparse per 8 GPUs
    # -> 4.5 sparse -> 2.25 PFLOP/s dense per GPU.
    "b200": 2.25e15,
    # NVIDIA H200 NVL (device_kind "NVIDIA H200 NVL"): datasheet 1,671 TFLOP/s sparse -> 835.5.
    "h200 nvl": 835.5e12,
    # NVIDIA H200 SXM (device_kind "NVIDIA H200"; also matches "NVIDIA GH200 480GB", whose GPU
    # has the same rate): datasheet 1,979 TFLOP/s sparse -> 989.5 dense.
    "h200": 989.5e12,
    # NVIDIA H100 PCIe (device_kind "NVIDIA H100 PCIe"): datasheet 1,513 sparse -> 756.5 dense.
    "h100 pcie": 756.5e12,
    # NVIDIA H100 NVL (device_kind "NVIDIA H100 NVL"): datasheet 1,671 sparse -> 835.5 dense.
    "h100 nvl": 835.5e12,
    # NVIDIA H100 SXM (device_kind "NVIDIA H100 80GB HBM3"): datasheet 1,979 sparse -> 989.5.
    "h100": 989.5e12,
    # NVIDIA A100 (device_kind "NVIDIA A100-SXM4-80GB", "NVIDIA A100-SXM4-40GB",
    # "NVIDIA A100 80GB PCIe", ...): datasheet 312 TFLOP/s dense (624 sparse), SXM and PCIe.
    "a100": 312e12,
}


@dataclasses.dataclass(frozen=True)
class Accelerator:
    """One accelerator kind; bandwidths in bytes/s, memory in bytes, all per chip."""

    name: str
    platform: str  # tpu | gpu | cpu
    device_kind: str  # key of PEAK_FLOPS_BF16 (peak per JAX device)
    devices_per_chip: int
    hbm_per_chip: float
    hbm_bw_per_chip: float
    ici_bw_per_chip: float
    dcn_bw_per_chip: float
    domain_chips: int
    note: str = ""

    @property
    def peak_flops(self) -> float:
        """Dense bf16 FLOP/s of one JAX device (0 when unknown, e.g. CPU)."""
        return PEAK_FLOPS_BF16.get(self.device_kind, 0.0)

    @property
    def hbm_bytes(self) -> float:
        """HBM of one JAX device."""
        return self.hbm_per_chip / self.devices_per_chip

    @property
    def hbm_bw(self) -> float:
        return self.hbm_bw_per_chip / self.devices_per_chip

    @property
    def ici_bw(self) -> float:
        return self.ici_bw_per_chip / self.devices_per_chip

    @property
    def dcn_bw(self) -> float:
        return self.dcn_bw_per_chip / self.devices_per_chip

    @property
    def domain_devices(self) -> int:
        return self.domain_chips * self.devices_per_chip


def _gbit(x: float) -> float:
    """Gbit/s -> bytes/s."""
    return x * 1e9 / 8


HARDWARE: dict[str, Accelerator] = {
    a.name: a
    for a in (
        # TPU v4: 275 TFLOP/s, 32 GiB HBM2 at 1,200 GB/s; 6 ICI links of 50 GB/s each way
        # (ISCA'23 TPU v4 paper) -> 600 GB/s bidirectional; 4,096-chip pod (3D torus).
        # DCN: assumed 25 Gbit/s per chip (one 100 Gbit/s NIC per 4-chip host).
        Accelerator("v4", "tpu", "tpu v4", 1, 32 * GIB, 1200 * GB, 600 * GB, _gbit(25), 4096),
        # TPU v5e: 197 TFLOP/s, 16 GB HBM2 at 819 GB/s, ICI 400 GB/s bidirectional per chip,
        # 256-chip pod (2D torus); DCN 6.4 Tbit/s per pod -> 25 Gbit/s per chip.
        Accelerator("v5e", "tpu", "tpu v5 lite", 1, 16 * GB, 819 * GB, 400 * GB, _gbit(25), 256),
        # TPU v5p: 459 TFLOP/s, 95 GiB HBM2e at 2,765 GB/s, ICI 1,200 GB/s bidirectional per
        # chip, DCN 50 Gbit/s per chip; 8,960-chip pod, largest slice 6,144 chips (3D torus).
        Accelerator("v5p", "tpu", "tpu v5p", 1, 95 * GIB, 2765 * GB, 1200 * GB, _gbit(50), 6144),
        # TPU v6e (Trillium): 918 TFLOP/s, 32 GB HBM at 1,638 GB/s, ICI 800 GB/s bidirectional
        # per chip, 256-chip pod (2D torus); DCN 25.6 Tbit/s per pod -> 100 Gbit/s per chip.
        Accelerator("v6e", "tpu", "tpu v6 lite", 1, 32 * GB, 1638 * GB, 800 * GB, _gbit(100), 256),
        # TPU7x (Ironwood): 2,307 TFLOP/s, 192 GiB HBM3e at 7,370 GB/s per chip, ICI 1.2 TB/s
        # bidirectional per chip, 9,216-chip pod. Two TensorCores = two JAX devices per chip.
        # DCN: assumed 100 Gbit/s per chip (not published per chip).
        Accelerator("tpu7x", "tpu", "tpu7x", 2, 192 * GIB, 7370 * GB, 1200 * GB, _gbit(100), 9216),
        # NVIDIA A100 SXM 80GB: 312 TFLOP/s dense bf16, 80 GB HBM2e at 2,039 GB/s, NVLink 3
        # 600 GB/s; 8 GPUs per NVLink domain (HGX); HDR InfiniBand 200 Gbit/s per GPU (DGX).
        Accelerator("a100", "gpu", "a100", 1, 80 * GB, 2039 * GB, 600 * GB, _gbit(200), 8),
        # NVIDIA H100 SXM: 989.5 TFLOP/s dense bf16, 80 GB HBM3 at 3.35 TB/s, NVLink 4
        # 900 GB/s; 8 per HGX node; NDR InfiniBand 400 Gbit/s per GPU (DGX H100).
        Accelerator("h100", "gpu", "h100", 1, 80 * GB, 3350 * GB, 900 * GB, _gbit(400), 8),
        # NVIDIA H200 SXM: 989.5 TFLOP/s dense bf16, 141 GB HBM3e at 4.8 TB/s, NVLink 900 GB/s;
        # 8 per HGX node; 400 Gbit/s per GPU.
        Accelerator("h200", "gpu", "h200", 1, 141 * GB, 4800 * GB, 900 * GB, _gbit(400), 8),
        # NVIDIA B200 (HGX/DGX B200): 2.25 PFLOP/s dense bf16, 180 GB HBM3e at 8 TB/s, NVLink 5
        # 1.8 TB/s; 8 per node; ConnectX-7 400 Gbit/s per GPU.
        Accelerator("b200", "gpu", "b200", 1, 180 * GB, 8000 * GB, 1800 * GB, _gbit(400), 8),
        # NVIDIA GB200 NVL72: 2.5 PFLOP/s dense bf16 per GPU, 186 GB HBM3e at 8 TB/s per GPU
        # (13.4 TB, 576 TB/s per 72), NVLink 5 1.8 TB/s, one 72-GPU NVLink domain;
        # 400 Gbit/s per GPU to the rest of the cluster.
        Accelerator("gb200", "gpu", "gb200", 1, 186 * GB, 8000 * GB, 1800 * GB, _gbit(400), 72),
        # The development machine's simulated devices: no peak, no HBM limit. Used to compare
        # the planner with XLA's CPU compiler.
        Accelerator("cpu", "cpu", "cpu", 1, 0.0, 0.0, 0.0, 0.0, 1 << 30),
    )
}

ALIASES = {
    "v5litepod": "v5e",
    "v5lite": "v5e",
    "trillium": "v6e",
    "ironwood": "tpu7x",
    "v7": "tpu7x",
    "v7x": "tpu7x",
    "h100-sxm": "h100",
    "h200-sxm": "h200",
}


def get(name: str) -> Accelerator:
    """The accelerator called `name` (or an alias); ValueError listing the known ones."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in HARDWARE:
        known = ", ".join(sorted(set(HARDWARE) | set(ALIASES)))
        raise ValueError(f"unknown hardware {name!r}; known: {known}")
    return HARDWARE[key]

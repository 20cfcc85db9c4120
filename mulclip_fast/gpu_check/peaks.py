"""The GPU's peak FLOP/s and memory bandwidth, from its architecture, SM count and clocks.

``peak FLOP/s = SMs × FLOPs per SM per clock × max SM clock``: the SM count comes from CUDA, the maximum SM
clock from NVML, the per-SM rate from the compute capability (:data:`FLOPS_PER_SM_PER_CLOCK`: dense, no
sparsity). ``peak bytes/s = memory bus width / 8 × max memory clock × 2`` (double data rate, as HBM2e/HBM3
report it through NVML: an H100 SXM's 5120-bit bus at 2619 MHz gives its 3.35 TB/s). Without NVML (no
driver, no nvidia-ml-py) the peaks are ``None`` and the report says why.

Which peak applies to a kernel: fp32 inputs run IEEE fp32 dots on the CUDA cores (``kernels/_aot.py``
``dot_precision``), so their yardstick is the fp32 (non-tensor) rate; fp16/bf16 inputs are measured against
the 16-bit tensor-core rate, the most the hardware could give them.
"""

from __future__ import annotations

from ..profiling import nvml_telemetry

# FLOPs per SM per clock (a fused multiply-add counts 2), dense. fp32: CUDA cores; tf32 and half (fp16/bf16
# with fp32 accumulation): tensor cores. A100 (8.0): 19.5 / 156 / 312 TFLOP/s at 108 SMs × 1410 MHz;
# H100/H200 (9.0): 256 / 2048 / 4096 per SM per clock, 67 / 535 / 1070 TFLOP/s at the 1980 MHz maximum SM
# clock NVML reports for an H100 SXM or an H200 (NVIDIA's datasheets quote 495 / 989 for tf32 / half at 1830 MHz);
# Ada (8.9, L40S) and GA10x (8.6, A10/A40): 256 fp32 and 512 / 1024 on the tensor cores. GeForce cards of
# those capabilities run fp16/bf16 with fp32 accumulation at half that tensor rate: against these peaks
# their fraction reads half what it is.
FLOPS_PER_SM_PER_CLOCK = {
    (8, 0): {"fp32": 128, "tf32": 1024, "half": 2048},
    (8, 6): {"fp32": 256, "tf32": 512, "half": 1024},
    (8, 9): {"fp32": 256, "tf32": 512, "half": 1024},
    (9, 0): {"fp32": 256, "tf32": 2048, "half": 4096},
}


def device_peaks(cuda_index: int = 0) -> dict:
    """``{"flops_per_s": {"fp32", "tf32", "half"}, "bytes_per_s", inputs…}`` of CUDA device ``cuda_index``;
    entries that cannot be derived are ``None`` with a ``reason``."""
    import torch

    props = torch.cuda.get_device_properties(cuda_index)
    capability = (props.major, props.minor)
    nvml = nvml_telemetry(cuda_index)
    fields = ("sm_clock_max_mhz", "memory_clock_max_mhz", "memory_bus_width_bits")
    clocks = {f: nvml.get(f) for f in fields} if nvml["available"] else {"reason": nvml["reason"]}
    out = {
        "name": props.name,
        "capability": f"{props.major}.{props.minor}",
        "multiprocessors": props.multi_processor_count,
        **clocks,
        "flops_per_s": None,
        "bytes_per_s": None,
    }
    rates = FLOPS_PER_SM_PER_CLOCK.get(capability)
    sm_clock = clocks.get("sm_clock_max_mhz")
    reasons = [clocks["reason"]] if "reason" in clocks else []
    if rates is None:
        reasons.append(f"no per-SM FLOP rate known for compute capability {out['capability']}")
    elif sm_clock:
        out["flops_per_s"] = {kind: props.multi_processor_count * rate * sm_clock * 1e6 for kind, rate in rates.items()}
    if clocks.get("memory_clock_max_mhz") and clocks.get("memory_bus_width_bits"):
        out["bytes_per_s"] = clocks["memory_bus_width_bits"] / 8 * clocks["memory_clock_max_mhz"] * 1e6 * 2
    if nvml["available"]:
        # NVML runs, but a counter this GPU (or a VM's driver) does not expose reads None
        unread = [f for f in fields if not clocks.get(f)]
        if unread:
            reasons.append(f"NVML did not report {', '.join(unread)}")
    if reasons:
        out["reason"] = "; ".join(reasons)
    return out


def peak_kind(dtype) -> str:
    """The key of :func:`device_peaks`' ``flops_per_s`` that measures a kernel on ``dtype`` inputs."""
    import torch

    return "fp32" if dtype == torch.float32 else "half"

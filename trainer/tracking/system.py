"""Node system metrics: CPU, memory, this process's RSS and, through NVML, every GPU.

Sampled by each node's local leader and logged by the training loop every
``tracking.system_metrics_every`` seconds. Without pynvml, an NVML library or a GPU, the GPU
keys are simply absent (never an error).
"""
from __future__ import annotations

_NVML_OK: bool | None = None


def _nvml():
    """pynvml, initialised once; None when NVML (or a GPU) is not there."""
    global _NVML_OK
    if _NVML_OK is False:
        return None
    try:
        import pynvml

        if not _NVML_OK:
            pynvml.nvmlInit()
            _NVML_OK = True
        return pynvml
    except Exception:  # noqa: BLE001 - NVMLError_LibraryNotFound, ImportError...: "no GPU"
        _NVML_OK = False
        return None


def _gpu_metrics(nvml) -> dict[str, float]:
    out: dict[str, float] = {}
    try:
        for i in range(nvml.nvmlDeviceGetCount()):
            h = nvml.nvmlDeviceGetHandleByIndex(i)
            util = nvml.nvmlDeviceGetUtilizationRates(h)
            mem = nvml.nvmlDeviceGetMemoryInfo(h)
            out[f"gpu{i}_utilization_percent"] = float(util.gpu)
            out[f"gpu{i}_memory_used_gb"] = mem.used / 2**30
            out[f"gpu{i}_memory_percent"] = 100.0 * mem.used / max(mem.total, 1)
            try:
                out[f"gpu{i}_power_w"] = nvml.nvmlDeviceGetPowerUsage(h) / 1000.0
            except nvml.NVMLError:
                pass  # some boards do not report power
    except nvml.NVMLError:
        pass
    return out


def sample_system_metrics() -> dict[str, float]:
    """This node's CPU %, memory and per-GPU utilisation / memory / power (NVML; skipped without a GPU)."""
    import psutil

    vm = psutil.virtual_memory()
    out = {
        "cpu_percent": float(psutil.cpu_percent(interval=None)),
        "memory_used_gb": (vm.total - vm.available) / 2**30,
        "memory_percent": float(vm.percent),
        "process_rss_gb": psutil.Process().memory_info().rss / 2**30,
    }
    nvml = _nvml()
    if nvml is not None:
        out.update(_gpu_metrics(nvml))
    return out

"""Node system metrics: CPU, memory, this process's RSS and, through NVML, every GPU.

Sampled by each node's local leader and logged by the training loop every
``tracking.system_metrics_every`` seconds. Without pynvml, an NVML library or a GPU, the GPU
keys are simply absent (never an error).

Names follow MLflow's own system metrics (``cpu_utilization_percentage``,
``gpu_0_utilization_percentage``, ...) and are logged as ``system/node_<N>/<name>``
(:func:`node_metrics`): MLflow's UI charts metrics under ``system/`` in a run's *System metrics*
tab, with per-node and per-GPU selectors for keys of the form ``node_<N>/`` and ``gpu_<i>_``
(checked in the UI of the pinned mlflow 3.17.2). Memory is in megabytes, as MLflow's.
"""
from __future__ import annotations

#: MLflow's UI shows metrics under this prefix in the System metrics tab.
SYSTEM_PREFIX = "system/"

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
            out[f"gpu_{i}_utilization_percentage"] = float(util.gpu)
            out[f"gpu_{i}_memory_usage_megabytes"] = mem.used / 2**20
            out[f"gpu_{i}_memory_usage_percentage"] = 100.0 * mem.used / max(mem.total, 1)
            try:
                out[f"gpu_{i}_power_usage_watts"] = nvml.nvmlDeviceGetPowerUsage(h) / 1000.0
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
        "cpu_utilization_percentage": float(psutil.cpu_percent(interval=None)),
        "system_memory_usage_megabytes": (vm.total - vm.available) / 2**20,
        "system_memory_usage_percentage": float(vm.percent),
        "process_rss_megabytes": psutil.Process().memory_info().rss / 2**20,
    }
    nvml = _nvml()
    if nvml is not None:
        out.update(_gpu_metrics(nvml))
    return out


def node_metrics(node: int, sample: dict[str, float]) -> dict[str, float]:
    """One node's sample as logged: ``system/node_<node>/<name>``."""
    return {f"{SYSTEM_PREFIX}node_{int(node)}/{k}": float(v) for k, v in sample.items()}

"""``python -m tcloss``: what this install of tcloss can do, for a bug report. Versions, how the
native extension was built (tcloss/_build_info.json), every op x device x backend with "ok" or
the reason it is missing, and the backend ``backend="auto"`` picks per device."""
from __future__ import annotations

import platform

import torch

import tcloss
from tcloss import _backends


def _triton_version() -> str:
    ok, why = _backends.triton_status()
    if not ok:
        return f"not available ({why})"
    import triton

    return triton.__version__


def report() -> str:
    lines = [f"tcloss {tcloss.__version__} ({tcloss.__file__})",
             f"python {platform.python_version()}, {platform.platform()}",
             f"torch {torch.__version__}, CUDA runtime {torch.version.cuda or 'none (CPU build)'}, "
             f"triton {_triton_version()}"]
    if torch.cuda.is_available():
        gpus = ", ".join(f"{torch.cuda.get_device_name(i)} (sm_{''.join(map(str, torch.cuda.get_device_capability(i)))})"
                         for i in range(torch.cuda.device_count()))
        lines.append(f"GPUs: {gpus}")
    else:
        lines.append("GPUs: none visible")
    info = _backends.build_info()
    if info:
        lines.append(f"native build: torch {info.get('torch')}, CUDA {info.get('torch_cuda')}, "
                     f"CPU kernels {'built' if info.get('cpu_built') else 'NOT built'}, CUDA kernels "
                     + ("built for " + info.get("cuda_arch_list", "?") if info.get("cuda_built")
                        else "attempted, NOT built" if info.get("cuda_attempted") else "not attempted")
                     + (f" (toolkit {info['cuda_home']})" if info.get("cuda_home") else ""))
        for err in info.get("errors", []):
            lines.append(f"  build problem: {err}")
    else:
        lines.append("native build: no build record (never built by setup.py here)")
    ok, why = _backends.native_status()
    lines.append(f"tcloss._C: {'loaded' if ok else why}")
    lines.append("")
    width = max(len(op) for op in _backends.OPS)
    for op, devices in tcloss.available_backends(verbose=True).items():
        for dev, backends in devices.items():
            auto = _backends.resolve(op, torch.device(dev), "auto") if dev == "cpu" or torch.cuda.is_available() \
                else "n/a (no GPU)"
            lines.append(f"{op:<{width}}  {dev:<4}  auto -> {auto}")
            for name, status in backends.items():
                lines.append(f"{'':<{width}}        {name:<9} {status}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())

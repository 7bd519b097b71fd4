"""Static resource usage of tcloss's Triton kernels on sm_90 (H100/H200), without a GPU.

What: for each kernel configuration the launchers really use, registers per thread, spills,
shared memory, num_warps, tensor-core instructions (``wgmma``/``mma`` in the PTX), how the scatter atomics are emitted (``red``/``atom`` and their memory
semantics) and how many global loads/stores are vectorised, printed as a markdown table.

How: each launcher is run on ``meta`` tensors with its kernel swapped for a recorder, so the
arguments, constexprs, grid and num_warps/num_stages are exactly the launcher's own (the
temporal loss at the benchmark shape 8x19x512x1024; pairwise and ConvLSTM with the CUDA tile
choice). Triton's own binder turns them into the signature and the divisibility-16
specialisations a CUDA launch would see, and ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", 90, 32))`` compiles for sm_90 on the CPU. Registers, stack and spills
come from the cubin (``cuobjdump --dump-resource-usage``; spill bytes from re-running triton's
bundled ptxas with ``-v`` and the flags triton uses), shared memory is the dynamic amount the
launch requests (``metadata.shared``). Atomics (with their memory semantics) and vector
accesses are counted in the PTX, global reductions/atomics, memory barriers, CTA barriers and
warp shuffles in the SASS (``REDG`` is a fire-and-forget reduction, ``ATOMG`` returns a value).
All counts are static instructions: a loop body counts once.

``--ext`` also lists the CUDA kernels of ``tcloss/_C*.so`` or of the files named after it
(registers/stack/shared/local from cuobjdump), if the extension was built with device code
(``make install`` builds it for sm_90 wherever nvcc is found).

    .venv/bin/python scripts/static_resources.py [--ext [LIB ...]] [--only temporal|pairwise|convlstm]

Caveat: the numbers belong to the triton/ptxas installed here (printed in the header); the GPU
machine may run another triton version.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import glob
import os
import re
import subprocess
import sys
import tempfile
import types

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import sm_arch_from_capability
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TARGET = GPUTarget("cuda", 90, 32)
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


# ---------------------------------------------------------------- capture the launchers' calls
class _Recorder:
    """Stands in for ``kernel`` (``kernel[grid](...)``) and for ``wrap_triton(kernel)[grid](...)``."""

    def __init__(self, fn, calls):
        self.fn, self.calls = fn, calls

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((self.fn, grid, args, kwargs))


@contextlib.contextmanager
def _patched(module, **attrs):
    old = {k: getattr(module, k) for k in attrs}
    for k, v in attrs.items():
        setattr(module, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(module, k, v)


def _meta(*shape, dtype=torch.float32):
    return torch.empty(shape, device="meta", dtype=dtype)


def temporal_calls(T=None):
    if T is None:
        from tcloss._backends import temporal_loss_triton as T
    calls, out = [], []
    B, C, H, W, CI = 8, 19, 512, 1024, 3
    # (on_prob, mask_mode, mask_power, zeros_padding, reduction): the defaults of temporal_loss
    opts = (True, 0, 1.0, False)
    with _patched(T, _temporal_loss_kernel=_Recorder(T._temporal_loss_kernel, calls),
                  _softmax_stats_kernel=_Recorder(T._softmax_stats_kernel, calls)):
        for dt in (torch.float32, torch.bfloat16):
            pred = lambda: _meta(B, C, H, W, dtype=dt)  # noqa: E731
            imgs = (_meta(B, 2, H, W), _meta(B, CI, H, W), _meta(B, CI, H, W))
            name = str(dt).replace("torch.", "")
            n = len(calls)
            T.temporal_loss_fwd_triton._init_fn(pred(), pred(), *imgs, *opts, 1)
            out += [(f"fwd, {name}", c) for c in calls[n:]]
            for label, grad, red in (("bwd mean (GRAD_MODE 1)", _meta(), 1),
                                     ("bwd map (GRAD_MODE 2)", _meta(B, H, W), 0)):
                n = len(calls)
                T.temporal_loss_bwd_triton._init_fn(grad, pred(), pred(), *imgs, *opts, red, True, True, True)
                out += [(f"{label}, {name}", c) for c in calls[n:]]
    return out


def pairwise_calls():
    """Per channel count (the tiles depend on it) and precision: forward mse/kl, and the one-pass
    backward for self-similarity (owner rows, both G terms) and for two tensors (owner columns,
    row side in ticket order)."""
    from tcloss._backends import pairwise_similarity_loss_triton as P
    calls, out = [], []
    rec = lambda fn: _Recorder(fn, calls)  # noqa: E731
    # the CUDA tiles: _blocks asks the tensor's device
    cuda_blocks = lambda x, *a, f=P._blocks: f(types.SimpleNamespace(device=torch.device("cuda"), dtype=x.dtype), *a)  # noqa: E731,E501
    B, N = 2, 4096
    with _patched(P, wrap_triton=rec, _blocks=cuda_blocks, triton_interpret=lambda: False):
        for Cs, Ct in ((19, 19), (128, 512)):
            s, t = (lambda: _meta(B, Cs, N)), (lambda: _meta(B, Ct, N))  # noqa: E731
            for prec in ("ieee", "tf32", "bf16"):
                for loss, lname in ((0, "mse"), (1, "kl")):
                    n = len(calls)
                    _, stats = P.pairwise_similarity_loss_fwd_triton._init_fn(s(), t(), s(), t(), loss, 1.0, 1e-8, False, prec)
                    out += [(f"fwd {lname}, C {Cs}/{Ct}, {prec}", c) for c in calls[n:]]
                    for case, two in (("self", False), ("cross", True)):
                        n = len(calls)
                        P.pairwise_similarity_loss_bwd_triton._init_fn(_meta(), s(), t(), s() if two else None, t() if two else None,
                                                                  stats, loss, 1.0, 1e-8, False, prec, True, True)
                        out += [(f"bwd {lname} {case}, C {Cs}/{Ct}, {prec}", c) for c in calls[n:]]
    return out


def convlstm_calls():
    from tcloss._backends import convlstm_cell_triton as L
    calls, out = [], []
    B, Hd, H, W = 4, 64, 64, 128
    with _patched(L, wrap_triton=lambda fn: _Recorder(fn, calls)):
        gates, c, peep = _meta(B, 4 * Hd, H, W), _meta(B, Hd, H, W), _meta(3, Hd, H, W)
        L.convlstm_cell_fwd_triton._init_fn(gates, c, peep)
        L.convlstm_cell_bwd_triton._init_fn(_meta(B, Hd, H, W), _meta(B, Hd, H, W), gates, c, peep, True)
    out += [("fwd, peephole", calls[0]), ("bwd, peephole + d peephole", calls[1])]
    return out


# ---------------------------------------------------------------- compile and inspect
def compile_call(fn, args, kwargs):
    """Compile ``fn[grid](*args, **kwargs)`` for TARGET the way JITFunction.run would."""
    backend = make_backend(TARGET)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=TARGET, options=options.__dict__)


def _run(cmd):
    return subprocess.run(cmd, capture_output=True, text=True)


def cubin_usage(kernel):
    with tempfile.TemporaryDirectory() as d:
        cubin, ptx = os.path.join(d, "k.cubin"), os.path.join(d, "k.ptx")
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        res = _run([os.path.join(BIN, "cuobjdump"), "--dump-resource-usage", cubin]).stdout
        sass = _run([os.path.join(BIN, "cuobjdump"), "-sass", cubin]).stdout
        # ptxas -v with triton's flags (make_cubin) for the spill bytes
        r = _run([os.path.join(BIN, "ptxas"), "-lineinfo", "-v", "--regAllocOptLevel=2",
                  f"--gpu-name={sm_arch_from_capability(TARGET.arch)}", ptx, "-o", os.path.join(d, "v.o")])
        log = r.stdout + r.stderr
    reg = int(re.search(r"REG:(\d+)", res).group(1))
    stack = int(re.search(r"STACK:(\d+)", res).group(1))
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    ops = collections.Counter(re.findall(r"\b(REDG|ATOMG|MEMBAR|BAR\.SYNC|SHFL)\b", sass))
    kinds = ("REDG", "ATOMG", "MEMBAR", "BAR.SYNC", "SHFL")
    sass_ops = " ".join(f"{k.split('.')[0]}:{ops[k]}" for k in kinds if ops[k])
    return reg, stack, (int(m.group(1)), int(m.group(2))) if m else ("?", "?"), sass_ops or "-"


_ATOMIC = re.compile(r"^\s*(?:@!?%p\d+\s+)?((?:red|atom)\.[\w.]+)", re.M)
_VEC = re.compile(r"^\s*(?:@!?%p\d+\s+)?((?:ld|st)\.global(?:\.\w+)*?\.v[24])", re.M)


_MMA = re.compile(r"^\s*(?:@!?%p\d+\s+)?(wgmma\.mma_async|mma\.sync)\.[\w.]+", re.M)


def ptx_summary(ptx):
    """(atomics, vector accesses, tensor-core MMAs: ``wgmma`` (Hopper) / ``mma`` (mma.sync))."""
    mma = collections.Counter(m.split(".")[0] for m in _MMA.findall(ptx))
    atom = collections.Counter(_ATOMIC.findall(ptx))
    vec = collections.Counter(("ld" if v.startswith("ld") else "st") + "." + v[-2:] for v in _VEC.findall(ptx))
    atoms = ", ".join(f"{n}x `{k}`" for k, n in sorted(atom.items())) or "-"
    vecs = " ".join(f"{k}:{vec[k]}" for k in ("ld.v4", "ld.v2", "st.v4", "st.v2") if vec[k]) or "-"
    return atoms, vecs, " ".join(f"{k}:{n}" for k, n in sorted(mma.items())) or "-"


def _config(fn, kwargs):
    keys = [p.name for p in fn.params if p.is_constexpr]
    return " ".join(f"{k}={kwargs[k]}" for k in keys if k in kwargs and not k.startswith("MAX"))


def triton_table(groups):
    ptxas = _run([os.path.join(BIN, "ptxas"), "--version"]).stdout.strip().splitlines()[-1]
    print(f"triton {triton.__version__}, ptxas {ptxas}, target sm_90 (compiled on the CPU; no GPU involved)\n")
    print("| kernel | case | constexprs | regs | spill st/ld B | stack B | smem B | warps | atomics (PTX) "
          "| SASS atomics/sync | vector ld/st | MMA (PTX) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for label, (fn, _grid, args, kwargs) in groups:
        k = compile_call(fn, args, kwargs)
        reg, stack, (sst, sld), sass_ops = cubin_usage(k)
        atoms, vecs, mma = ptx_summary(k.asm["ptx"])
        print(f"| `{fn.__name__}` | {label} | {_config(fn, kwargs)} | {reg} | {sst}/{sld} | {stack} | "
              f"{k.metadata.shared} | {k.metadata.num_warps} | {atoms} | {sass_ops} | {vecs} | {mma} |")


def ext_table(libs=None):
    libs = glob.glob(os.path.join(ROOT, "tcloss", "_C*.so")) if libs is None else libs
    print("\n## CUDA extension\n")
    if not libs:
        print("no tcloss/_C*.so")
        return
    for lib in libs:
        r = _run([os.path.join(BIN, "cuobjdump"), "--dump-resource-usage", lib])
        text = r.stdout + r.stderr
        rows, arch = [], "?"  # (arch, mangled name, regs, stack, shared, local), arch from the section header
        for line in text.splitlines():
            if m := re.match(r"\s*arch = (sm_\w+)", line):
                arch = m.group(1)
            elif m := re.match(r"\s*Function (\S+):", line):
                rows.append([arch, m.group(1)])
            elif (m := re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)) and rows:
                rows[-1] += m.groups()
        if not rows:
            print(f"{os.path.basename(lib)}: {text.strip().splitlines()[-1] if text.strip() else 'no device code'}")
            continue
        dem = subprocess.run(["c++filt"], input="\n".join(r[1] for r in rows), capture_output=True,
                             text=True).stdout.splitlines()
        print(f"{os.path.basename(lib)}\n")
        print("| kernel | arch | regs | stack B | static smem B | local B |")
        print("|---|---|---|---|---|---|")
        for (arch, _mangled, reg, stack, shared, local), name in zip(rows, dem):
            short = re.sub(r"^void ", "", name.replace("(anonymous namespace)::", ""))
            short = re.sub(r"\(.*", "", short)  # drop the parameter list
            short = re.sub(r"<.*>", lambda m: "<" + ",".join(
                s.strip().split("::")[-1] for s in m.group(0)[1:-1].split(",")) + ">", short)
            print(f"| `{short}` | {arch} | {reg} | {stack} | {shared} | {local} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ext", nargs="*", metavar="LIB",
                    help="also the CUDA kernels of tcloss/_C*.so (or of the extensions named)")
    ap.add_argument("--only", choices=("temporal", "pairwise", "convlstm"), action="append")
    a = ap.parse_args()
    which = a.only or ["temporal", "pairwise", "convlstm"]
    groups = []
    for name, get in (("temporal", temporal_calls), ("pairwise", pairwise_calls), ("convlstm", convlstm_calls)):
        if name in which:
            groups += get()
    triton_table(groups)
    if a.ext is not None:
        ext_table(a.ext or None)


if __name__ == "__main__":
    main()

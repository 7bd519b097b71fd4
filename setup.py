"""Build of tcloss and its optional native extension ``tcloss._C``.

* C++ CPU kernels are always built (unless ``TCLOSS_BUILD_EXT=0``).
* CUDA kernels are added when torch is a CUDA build and nvcc is found
  (``TCLOSS_BUILD_CUDA=0`` skips them; ``TORCH_CUDA_ARCH_LIST`` picks the targets,
  default "8.0;8.6;8.9;9.0").
* The CUDA toolkit is looked for where users have it: ``CUDA_HOME``/``CUDA_PATH``, the folder
  of the real ``nvcc`` on ``PATH`` (through symlinks), ``/usr/local/cuda``; a folder counts only
  if it holds both ``bin/nvcc`` and the CUDA runtime library.
* A failing native build never fails the install: a failed CUDA build falls back to the CPU
  kernels, a failed CPU build to no extension (Triton and reference backends). What was tried
  and what failed is recorded in ``tcloss/_build_info.json``, which ``python -m tcloss`` and
  ``tcloss.available_backends(verbose=True)`` report and ``import tcloss`` warns about once
  (set ``TCLOSS_REQUIRE_EXT=1`` to make a failed build an error, as CI does).

Build against the torch already installed: ``pip install --no-build-isolation .``
"""
import glob
import json
import os
import platform
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name, default):
    return os.environ.get(name, default).strip().lower() not in ("0", "false", "no", "off", "")


def _ext_modules_and_cmdclass():
    if not _flag("TCLOSS_BUILD_EXT", "1"):
        print("tcloss: TCLOSS_BUILD_EXT=0, skipping the native extension", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension as ce
    except Exception as e:  # torch missing at build time: pure-Python install
        print(f"tcloss: torch not importable ({e}); skipping the native extension", file=sys.stderr)
        return [], {}

    # csrc/tcloss.cpp (the schemas) and one folder per op, csrc/<op>/ (<op>_cpu.cpp, <op>_cuda.cu);
    # csrc/common/ holds headers only.
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "*", "*.cpp")))
    # TCLOSS_EXT_ONLY=temporal_loss,... builds only those ops' kernels (schemas are always built):
    # a fallback for bisecting a broken kernel file.
    only = [x for x in os.environ.get("TCLOSS_EXT_ONLY", "").split(",") if x]

    def keep(path):
        folder = os.path.dirname(path)
        return not only or folder == "csrc" or os.path.basename(folder) in only

    sources = [p for p in sources if keep(p)]
    include_dirs = [os.path.join(ROOT, "csrc")]
    # No -std flag: torch.utils.cpp_extension adds the standard the installed torch needs.
    # -fno-trapping-math: lets the vectoriser if-convert branch-free selects (no value changes).
    cxx = ["-O3", "-fvisibility=hidden", "-fno-trapping-math"]
    if sys.platform != "win32":
        cxx.append("-fopenmp")
    want_cuda = _flag("TCLOSS_BUILD_CUDA", "1") and torch.version.cuda is not None
    cuda_home = _find_cuda_home(ce.CUDA_HOME) if want_cuda else None
    info = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "python": platform.python_version(),
            "cxx": os.environ.get("CXX", "c++"), "cuda_home": cuda_home, "cuda_attempted": bool(cuda_home),
            "cuda_built": False, "cpu_built": False, "errors": []}
    if not want_cuda:
        info["cuda_note"] = ("skipped: TCLOSS_BUILD_CUDA=0" if torch.version.cuda is not None
                             else "skipped: torch is a CPU-only build")
    if want_cuda and not cuda_home:
        info["errors"].append("CUDA kernels not attempted: no CUDA toolkit found (nvcc and the CUDA runtime library "
                              "under CUDA_HOME, the real nvcc's folder or /usr/local/cuda)")
        print(f"tcloss: {info['errors'][-1]}; building CPU kernels only", file=sys.stderr)
    cpu_ext = ce.CppExtension(
        "tcloss._C",
        sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"] if sys.platform != "win32" else [],
    )
    ext = cpu_ext
    if cuda_home:
        # torch.utils.cpp_extension read CUDA_HOME at import: point it at the toolkit found
        os.environ["CUDA_HOME"] = ce.CUDA_HOME = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;8.6;8.9;9.0")
        info["cuda_arch_list"] = os.environ["TORCH_CUDA_ARCH_LIST"]
        ext = ce.CUDAExtension(
            "tcloss._C",
            sources + [p for p in sorted(glob.glob(os.path.join("csrc", "*", "*.cu"))) if keep(p)],
            include_dirs=include_dirs,
            define_macros=[("TCLOSS_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=["-fopenmp"] if sys.platform != "win32" else [],
        )

    class SoftBuildExt(ce.BuildExtension):
        """BuildExtension that falls back (CUDA -> CPU -> none) instead of failing the install
        (unless TCLOSS_REQUIRE_EXT=1), and records what it built in tcloss/_build_info.json."""

        def run(self):
            inplace = self.inplace  # setuptools zeroes it during a run and restores it only on success
            try:
                super().run()
                info["cuda_built"] = ext is not cpu_ext
                info["cpu_built"] = True
            except Exception as e:  # noqa: BLE001 - any compiler/toolchain failure
                if _flag("TCLOSS_REQUIRE_EXT", "0"):
                    raise
                info["errors"].append(f"{'CUDA' if ext is not cpu_ext else 'CPU'} build failed: {e}")
                print(f"tcloss: WARNING: {info['errors'][-1]}", file=sys.stderr)
                if ext is not cpu_ext:
                    # the same (finalized) Extension object made CPU-only: sources, flags, libraries
                    for key, value in vars(cpu_ext).items():
                        if not key.startswith("_"):
                            setattr(ext, key, value)
                    self.compiler = None  # the failed run left a compiler object that run() cannot reuse
                    self.inplace = inplace
                    try:
                        super().run()
                        info["cpu_built"] = True
                    except Exception as e2:  # noqa: BLE001
                        info["errors"].append(f"CPU build failed: {e2}")
                        print(f"tcloss: WARNING: {info['errors'][-1]}", file=sys.stderr)
                if not info["cpu_built"]:
                    print("tcloss: WARNING: installing without the native extension (Triton/reference backends "
                          "only)", file=sys.stderr)
            self._write_info()

        def _write_info(self):
            # the build folder (packaged by install/wheel) and the source tree (editable and
            # in-place builds import from there; the file is git-ignored)
            folders = [os.path.join(self.build_lib, "tcloss"), os.path.join(ROOT, "tcloss")]
            for folder in folders:
                os.makedirs(folder, exist_ok=True)
                with open(os.path.join(folder, "_build_info.json"), "w") as f:
                    json.dump(info, f, indent=1)

    return [ext], {"build_ext": SoftBuildExt.with_options(use_ninja=_flag("TCLOSS_USE_NINJA", "1"))}


def _cuda_runtime_in(home):
    pats = ("lib64/libcudart.so*", "lib/libcudart.so*", "targets/*/lib/libcudart.so*", "lib/x64/cudart.lib")
    return any(glob.glob(os.path.join(home, p)) for p in pats)


def _find_cuda_home(torch_guess):
    """A CUDA toolkit folder with bin/nvcc and the runtime library, or None."""
    nvcc = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), torch_guess,
                  os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None, "/usr/local/cuda"]
    for home in candidates:
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")) and _cuda_runtime_in(home):
            return home
    return None


ext_modules, cmdclass = _ext_modules_and_cmdclass()
setup(ext_modules=ext_modules, cmdclass=cmdclass)

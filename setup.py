"""Build fastcnn and its extension ``fastcnn._C``.

Environment variables (the FlashAttention convention: the build says what it does and why):
  FASTCNN_CUDA=1|0      force / skip the CUDA sources (default: build them when the installed
                        torch is a CUDA build and nvcc is found)
  FASTCNN_CUDA_ARCH     CUDA architectures (same syntax as TORCH_CUDA_ARCH_LIST, which is
                        honoured if set), e.g. "8.6" for one GPU or "7.5;8.6+PTX". Default:
                        the visible GPUs' own when the build machine has GPUs; otherwise
                        DEFAULT_CUDA_ARCHS (Turing, Ampere, Ada, Hopper + PTX) joined with
                        the architectures the installed torch was built for, limited to what
                        nvcc can compile (see cuda_arch_list)
  FASTCNN_NO_EXT=1      skip the extension entirely (pure-Python install)
  MAX_JOBS              parallel compile jobs (torch's own variable)
  FASTCNN_CPU_AVX2=0    skip the AVX2 build of the CPU kernels (default: built on x86-64)

The CPU kernels are compiled twice, as ATen compiles its own: csrc/**/*.cpp with the
ordinary flags (DEFAULT, any CPU) and csrc/**/avx2/*.cpp with -mavx2 -mfma -mf16c
(CPU_CAPABILITY=AVX2); the extension picks one at run time (csrc/channel_act/cpu/dispatch.cpp).

The extension is built against the torch of the environment it is installed into, so that
its ABI matches at run time; ``pip install --no-build-isolation -e .`` is the fast path.
"""
from __future__ import annotations

import glob
import os
import platform
import shutil
import sys
import sysconfig

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def say(msg: str) -> None:
    print(f"fastcnn setup: {msg}", file=sys.stderr)


def fail(msg: str) -> None:
    """One actionable line instead of a traceback from deep inside setuptools."""
    sys.stderr.write(f"\nfastcnn setup error: {msg}\n\n")
    raise SystemExit(1)


def import_torch():
    try:
        import torch  # noqa: F401
    except ImportError:
        # pip's build isolation hides the target environment; the extension must be built
        # against *that* torch (ABI), so look there before giving up.
        import site

        site.addsitedir(sysconfig.get_paths()["purelib"])  # appended: the build's own tools win
        try:
            import torch  # noqa: F401
        except ImportError:
            fail("PyTorch is not installed in this environment. Install it first "
                 "(e.g. `pip install torch`), then `pip install --no-build-isolation -e .`; "
                 "or set FASTCNN_NO_EXT=1 for a pure-Python install.")
    import torch

    return torch


def find_cuda_home() -> None:
    """torch guesses CUDA_HOME from ``which nvcc`` (here /usr/local/bin/nvcc -> /usr/local,
    which has no CUDA headers); point it at the real toolkit before torch reads it."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for home in candidates:
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")) and \
                os.path.exists(os.path.join(home, "bin", "nvcc")):
            os.environ["CUDA_HOME"] = home
            return


def want_cuda(torch) -> bool:
    flag = os.environ.get("FASTCNN_CUDA", "").strip()
    from torch.utils.cpp_extension import CUDA_HOME

    nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")))
    if flag == "0":
        say("FASTCNN_CUDA=0: skipping the CUDA sources")
        return False
    if flag == "1":
        if torch.version.cuda is None:
            fail(f"FASTCNN_CUDA=1 but torch {torch.__version__} is a CPU build; install a CUDA build of torch.")
        if not nvcc:
            fail("FASTCNN_CUDA=1 but nvcc was not found; install the CUDA toolkit or set CUDA_HOME.")
        return True
    if torch.version.cuda is None:
        say(f"torch {torch.__version__} is a CPU build: building the CPU kernels only")
        return False
    if not nvcc:
        say("nvcc not found (set CUDA_HOME): building the CPU kernels only")
        return False
    say(f"torch {torch.__version__} (CUDA {torch.version.cuda}) and nvcc found: building CPU and CUDA kernels")
    return True


#: the GPUs the project targets when the build machine shows none: Turing (sm_75: T400, GTX
#: 1650, MX450/550), Ampere (sm_80: A100; sm_86: RTX 30xx, MX570, A500), Ada (sm_89), Hopper
#: (sm_90), and compute_90 PTX so that newer GPUs can JIT-compile it.
DEFAULT_CUDA_ARCHS = "7.5;8.0;8.6;8.9;9.0+PTX"


def _arch_key(a: str) -> tuple[int, int]:
    major, minor = a.split(".")
    return int(major), int(minor.rstrip("afAF") or 0)


def nvcc_archs() -> set[str] | None:
    """The real architectures the nvcc in use compiles for ("7.5", ...), or None if unknown."""
    import re
    import subprocess

    from torch.utils.cpp_extension import CUDA_HOME

    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else shutil.which("nvcc")
    try:
        out = subprocess.run([nvcc, "--list-gpu-code"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError, TypeError):
        return None
    found = {f"{m[:-1]}.{m[-1]}" for m in re.findall(r"sm_(\d+)\b", out)}
    return found or None


def cuda_arch_list(torch) -> str:
    """The TORCH_CUDA_ARCH_LIST to build with, and say why. Order of precedence:

    1. FASTCNN_CUDA_ARCH, then TORCH_CUDA_ARCH_LIST, as given (CI builds a single arch to save
       time; a user with one GPU can do the same);
    2. the visible GPUs' own compute capabilities (the build machine is the run machine);
    3. DEFAULT_CUDA_ARCHS joined with what the installed torch was built for (whichever list
       is wider wins each arch), dropping what nvcc cannot compile, PTX for the newest.

    A library built without a GPU's architecture cannot run there: fastcnn.backend then
    reports the ``cuda`` backend unavailable for that GPU (naming FASTCNN_CUDA_ARCH) instead
    of failing at the first launch.
    """
    for var in ("FASTCNN_CUDA_ARCH", "TORCH_CUDA_ARCH_LIST"):
        value = os.environ.get(var, "").strip()
        if value:
            say(f"CUDA architectures from {var}: {value}")
            return value
    try:
        n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - a broken driver is "no GPU" for the build
        n_gpu = 0
    if n_gpu:
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(n_gpu)})
        arch = ";".join(f"{a}.{b}" for a, b in caps)
        names = sorted({torch.cuda.get_device_name(i) for i in range(n_gpu)})
        say(f"CUDA architectures of the visible GPUs ({', '.join(names)}): {arch} "
            "(set FASTCNN_CUDA_ARCH to build for other GPUs too)")
        return arch
    archs = {a.replace("+PTX", "") for a in DEFAULT_CUDA_ARCHS.split(";")}
    torch_flags = getattr(torch._C, "_cuda_getArchFlags", lambda: "")() or ""
    torch_archs = {f"{f[3:-1]}.{f[-1]}" for f in torch_flags.split() if f.startswith("sm_") and f[3:].isdigit()}
    archs |= torch_archs
    supported = nvcc_archs()
    if supported is not None:
        dropped = sorted(archs - supported, key=_arch_key)
        if dropped:
            say(f"nvcc cannot compile for {', '.join(dropped)}: left out")
        archs &= supported
    if not archs:
        fail("nvcc supports none of the CUDA architectures fastcnn targets; set FASTCNN_CUDA_ARCH.")
    ordered = sorted(archs, key=_arch_key)
    arch = ";".join(ordered[:-1] + [ordered[-1] + "+PTX"])
    say(f"no GPU visible: building for {arch} (the project's targets {DEFAULT_CUDA_ARCHS}"
        f"{' and torch' + chr(39) + 's own ' + ';'.join(sorted(torch_archs, key=_arch_key)) if torch_archs else ''}"
        "); set FASTCNN_CUDA_ARCH=<one arch, e.g. 8.6> for a faster build")
    return arch


def built_arch_macros() -> list[tuple[str, str]]:
    """``-D`` defines recording the real (cubin) and virtual (PTX) architectures nvcc is given,
    read from torch's own translation of TORCH_CUDA_ARCH_LIST into ``-gencode`` flags, so the
    extension can report exactly what it holds (``fastcnn._C.cuda_archs()``). Values are
    comma-separated integers (e.g. SASS 75,80,86 and PTX 90), which survive every shell;
    an arch-specific target (sm_90a) is recorded negated (-90): it runs on 9.0 only."""
    import re

    from torch.utils.cpp_extension import _get_cuda_arch_flags

    sass, ptx = [], []
    for flag in _get_cuda_arch_flags():
        m = re.search(r"code=(sm|compute)_(\d+)([af]?)", flag)
        if not m:
            continue
        num = int(m.group(2)) * (-1 if m.group(3) == "a" else 1)
        (sass if m.group(1) == "sm" else ptx).append(num)
    if not sass and not ptx:
        fail("could not read the CUDA architectures from torch's -gencode flags; set FASTCNN_CUDA_ARCH.")
    return [("FASTCNN_CUDA_SASS", ",".join(map(str, sass)) or "0"),
            ("FASTCNN_CUDA_PTX", ",".join(map(str, ptx)) or "0")]


def pip_cuda_include_dirs() -> list[str]:
    """Headers that torch's CUDA headers include (cuSPARSE, cuBLAS, ...) ship in pip's
    ``nvidia`` packages; add them so no one has to set paths by hand."""
    dirs = []
    for base in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        dirs += glob.glob(os.path.join(base, "nvidia", "cu*", "include"))
        dirs += glob.glob(os.path.join(base, "nvidia", "*", "include"))
    return sorted(set(d for d in dirs if os.path.isdir(d)))


# per-file flags of the AVX2 CPU kernels (ATen's own AVX2 flags and capability macros)
AVX2_SOURCES = "csrc/**/avx2/*.cpp"
AVX2_FLAGS = ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]


def want_avx2() -> bool:
    if os.environ.get("FASTCNN_CPU_AVX2", "").strip() == "0":
        say("FASTCNN_CPU_AVX2=0: building the DEFAULT CPU kernels only")
        return False
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "i386") or sys.platform == "win32":
        say(f"{platform.machine()}: building the DEFAULT CPU kernels only (AVX2 build is x86-64 with gcc/clang)")
        return False
    return True


def build_ext_class(base):
    """torch's BuildExtension, plus per-file flags for the AVX2 CPU kernels: those sources are
    compiled first, with the extension's own flags and AVX2_FLAGS, and linked after every
    other object (so that the linker keeps the baseline copy of any inline function the two
    builds share)."""

    class BuildExt(base):
        def build_extension(self, ext):
            avx2 = [s for s in ext.sources if s in getattr(ext, "fastcnn_avx2_sources", ())]
            if avx2:
                ext.sources = [s for s in ext.sources if s not in avx2]
                args = ext.extra_compile_args
                post = dict(args, cxx=list(args.get("cxx", [])) + AVX2_FLAGS) if isinstance(args, dict) \
                    else list(args or []) + AVX2_FLAGS
                macros = list(ext.define_macros) + [(u,) for u in ext.undef_macros]
                objs = self.compiler.compile(avx2, output_dir=self.build_temp, macros=macros,
                                             include_dirs=ext.include_dirs, debug=self.debug,
                                             extra_postargs=post, depends=ext.depends)
                ext.extra_objects = list(ext.extra_objects or []) + list(objs)
            super().build_extension(ext)

    return BuildExt


def openmp_flags(torch) -> tuple[list[str], list[str]]:
    """(compile, link) flags for OpenMP. at::parallel_for is OpenMP *in the header*
    (ATen/ParallelOpenMP.h): compiled without -fopenmp, the extension's kernels run on one
    thread whatever torch.set_num_threads says. Link against the libgomp that torch itself
    loads (the wheels bundle one in torch/lib) so that both share one OpenMP runtime and
    thread pool; fall back to the compiler's own (-fopenmp) when torch has none of its own."""
    if sys.platform != "linux" or not torch._C.has_openmp:
        say("torch has no OpenMP here: the CPU kernels run on one thread")
        return [], []
    bundled = sorted(glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp*.so*")))
    if bundled:
        say(f"OpenMP: linking torch's own {os.path.basename(bundled[0])}")
        return ["-fopenmp"], [bundled[0]]
    return ["-fopenmp"], ["-fopenmp"]


def extensions():
    if os.environ.get("FASTCNN_NO_EXT") == "1":
        say("FASTCNN_NO_EXT=1: installing without the extension")
        return [], {}
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        fail("no C++ compiler found (c++); install one (e.g. `apt-get install g++`) or set CXX.")
    find_cuda_home()
    torch = import_torch()
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    # every C++ source under csrc/ (per-op folders with their cpu/ and cuda/ parts), the AVX2
    # copies apart (compiled with their own flags below)
    avx2_all = set(glob.glob(AVX2_SOURCES, recursive=True))
    sources = sorted(s for s in glob.glob("csrc/**/*.cpp", recursive=True) if s not in avx2_all)
    # torch's build helper picks the C++ standard; ATen's vec headers carry nvcc-only `#pragma unroll`
    extra = {"cxx": ["-O3", "-Wno-unknown-pragmas"]}
    omp_compile, omp_link = openmp_flags(torch)
    extra["cxx"] += omp_compile
    define_macros = []
    include_dirs = [os.path.join(ROOT, "csrc")]
    if want_cuda(torch):
        os.environ["TORCH_CUDA_ARCH_LIST"] = cuda_arch_list(torch)
        sources += sorted(glob.glob("csrc/**/*.cu", recursive=True))
        define_macros.append(("WITH_CUDA", None))
        # C++ only: nvcc splits -D values at commas (-DX=75,80 -> -DX=75 -D80), and only
        # csrc/fastcnn.cpp reads these
        extra["cxx"] += [f"-D{name}={value}" for name, value in built_arch_macros()]
        include_dirs += pip_cuda_include_dirs()
        extra["nvcc"] = ["-O3", "--use_fast_math", "-lineinfo",
                         "--expt-relaxed-constexpr"]
        ext_cls = CUDAExtension
    else:
        ext_cls = CppExtension
    avx2_sources = sorted(avx2_all) if want_avx2() else []
    if avx2_sources:
        define_macros.append(("FASTCNN_CPU_AVX2", None))
    ext = ext_cls("fastcnn._C", sources + avx2_sources, include_dirs=include_dirs,
                  define_macros=define_macros, extra_compile_args=extra, extra_link_args=omp_link)
    ext.fastcnn_avx2_sources = tuple(avx2_sources)
    build_cls = build_ext_class(BuildExtension).with_options(use_ninja=shutil.which("ninja") is not None)
    return [ext], {"build_ext": build_cls}


ext_modules, cmdclass = extensions()

# the package's metadata (name, version, dependencies, console scripts) is in pyproject.toml
setup(ext_modules=ext_modules, cmdclass=cmdclass)

"""How the convolution GEMMs choose their tile config on a GPU (kernels/conv_gemm.py), tested
on CPU with the device queries faked: bucketed keys, pruning by shared memory and (below
sm_80) by register pressure, a fixed config under deterministic mode, results cached on disk.
What compiles where is checked by tests/test_triton_compile.py."""
import pytest
import torch

pytest.importorskip("triton")
from fastcnn.kernels import conv_gemm as cg  # noqa: E402

TUNERS = {"fwd": cg._conv_fwd_tuned, "dgrad": cg._conv_dgrad_tuned, "wgrad": cg._conv_wgrad_tuned}


def test_keys_use_the_bucket_not_the_exact_pixel_count():
    for name, tuner in TUNERS.items():
        assert "M_BUCKET" in tuner.keys and "M" not in tuner.keys and "MX" not in tuner.keys, name
        assert "K_PER_SPLIT" not in tuner.keys, name  # follows M: would defeat the bucket
    # batch 128 vs the last partial batch of CIFAR-10's 50000 (80 images) vs 100: one bucket
    assert cg.m_bucket(128 * 32 * 32) == cg.m_bucket(100 * 32 * 32) == 131072
    assert cg.m_bucket(80 * 32 * 32) == 131072 and cg.m_bucket(2 * 32 * 32) == 2048
    assert cg.m_bucket(1) == 1 and cg.m_bucket(1025) == 2048


def test_results_cached_across_processes_and_timed_with_a_small_flush():
    from fastcnn.kernels.utils import bench_l2_flush
    for name, tuner in TUNERS.items():
        # Triton disables the disk cache under the interpreter itself; the setting is what counts
        assert tuner.cache_results or cg.interpreting(), name
        assert tuner.do_bench is bench_l2_flush, name


def _nargs(kernel, dtype, **shape):
    """Named arguments of a launch: tensors of ``dtype`` for the pointers, ``shape`` ints."""
    x = torch.empty(4, dtype=dtype)
    return {n: (x if n.endswith("_ptr") else shape.get(n, 64)) for n in kernel.arg_names}


def _kept(tuner, kernel, monkeypatch, smem, cap, dtype=torch.float32, **shape):
    monkeypatch.setattr(cg, "device_limits", lambda device: (smem, cap))
    return tuner.early_config_prune(tuner.configs, _nargs(kernel, dtype, **shape))


KERNELS = {"fwd": cg._conv_fwd_kernel, "dgrad": cg._conv_dgrad_kernel, "wgrad": cg._conv_wgrad_kernel}
GPUS = {"sm_75": (65536, (7, 5)), "sm_86": (101376, (8, 6)), "sm_80": (166912, (8, 0)), "sm_90": (232448, (9, 0))}


@pytest.mark.parametrize("gpu", GPUS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("which", KERNELS)
def test_pruned_configs_fit_the_device(monkeypatch, gpu, dtype, which):
    smem, cap = GPUS[gpu]
    shape = dict(CIN_G=128, COUT_G=128, M=1 << 17)
    kept = _kept(TUNERS[which], KERNELS[which], monkeypatch, smem, cap, dtype, **shape)
    assert kept, "every GEMM keeps at least one config on every target"
    for c in kept:
        assert cg.smem_estimate(c, dtype.itemsize) <= smem
        if cap < (8, 0):
            assert cg.fits_fma(c)
    everything = _kept(TUNERS[which], KERNELS[which], monkeypatch, 1 << 30, (9, 0), dtype, **shape)
    if gpu == "sm_75":  # the big tiles are gone on the small card, kept on a large one
        assert len(kept) < len(everything)


def test_fma_rule_matches_the_measured_spills():
    clean = [cg._cfg(64, 32, 32, 4, 4), cg._cfg(64, 16, 16, 2, 4), cg._cfg(16, 16, 64, 4, 3)]
    spill = [cg._cfg(64, 64, 32, 4, 4), cg._cfg(128, 32, 32, 4, 4), cg._cfg(32, 32, 64, 4, 3),
             cg._cfg(64, 64, 64, 4, 3), cg._cfg(128, 128, 32, 8, 3)]
    assert all(cg.fits_fma(c) for c in clean) and not any(cg.fits_fma(c) for c in spill)


def test_smem_estimate_matches_the_issue_figure():
    # fp32 128x64x64, 3 stages: 3 x (128*64 + 64*64) x 4 B = 144 KiB (the compiler: ~147 KiB on sm_90)
    assert cg.smem_estimate(cg._cfg(128, 64, 64, 8, 3), 4) == 147456


class _FakeKernel:
    def __init__(self, arg_names):
        self.arg_names, self.launches = arg_names, []

    def __getitem__(self, grid):
        return lambda *a, **kw: self.launches.append(kw)


class _FakeTuner(_FakeKernel):
    def __init__(self, configs, prune):
        super().__init__(["x_ptr", "CIN_G", "COUT_G"])
        self.configs, self.early_config_prune, self.best_config = configs, prune, configs[0]


def test_deterministic_mode_launches_the_fixed_config_without_timing(monkeypatch):
    monkeypatch.setattr(cg, "device_limits", lambda device: (232448, (9, 0)))
    tuner = _FakeTuner(cg._GPU_CONFIGS, cg._prune("COUT_G", "CIN_G", "x_ptr"))
    kernel = _FakeKernel(tuner.arg_names)
    args, meta = (torch.empty(4), 128, 128), {"KH": 3}
    with _deterministic(True):
        cfg = cg._launch(tuner, kernel, None, args, meta, cg._FWD_FIXED)
    assert cfg is cg._FWD_FIXED and tuner.launches == []
    assert kernel.launches == [dict(meta, **cg._FWD_FIXED.all_kwargs())]
    # the fixed config pruned away (tiny channel count): the smallest kept one, still no timing
    args = (torch.empty(4), 3, 128)
    with _deterministic(True):
        cfg = cg._launch(tuner, kernel, None, args, meta, cg._FWD_FIXED)
    assert cfg is not cg._FWD_FIXED and cfg.kwargs["BLOCK_K"] == 16 and tuner.launches == []
    # not deterministic: the autotuner decides
    with _deterministic(False):
        assert cg._launch(tuner, kernel, None, args, meta, cg._FWD_FIXED) is tuner.best_config
    assert tuner.launches == [meta]


def test_fixed_configs_fit_every_targets_shared_memory():
    # (below sm_80 the FMA rule may still drop them: _launch then takes the smallest kept one)
    for fixed in (cg._FWD_FIXED, cg._DGRAD_FIXED, cg._WGRAD_FIXED):
        for smem, _ in GPUS.values():
            assert cg.smem_estimate(fixed, 4) <= smem


class _deterministic:
    def __init__(self, on):
        self.on = on

    def __enter__(self):
        self.before = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(self.on)

    def __exit__(self, *exc):
        torch.use_deterministic_algorithms(self.before)

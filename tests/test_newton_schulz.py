"""Newton–Schulz orthogonalization: newton_schulz_ref's shapes, schedules and singular-value band."""
import pytest
import torch

import bdiff.kernels.newton_schulz as nsk
from bdiff.kernels.reference import QUINTIC, newton_schulz_ref
from bdiff.training.muon import SCHEDULES


@pytest.mark.parametrize("shape", [(64, 96), (96, 64), (3, 40, 24)])
def test_quintic_singular_values_in_band(gen, shape):
    out = newton_schulz_ref(torch.randn(*shape, generator=gen, dtype=torch.float64))
    s = torch.linalg.svdvals(out)
    # The quintic trades exactness for speed: 5 steps land singular values in roughly [0.68, 1.2].
    assert s.min() > 0.6 and s.max() < 1.25, f"singular values out of band: [{s.min():.3f}, {s.max():.3f}]"


def test_ill_conditioned_input_lands_in_band(gen):
    U, _ = torch.linalg.qr(torch.randn(64, 64, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(64, 64, generator=gen, dtype=torch.float64))
    G = U @ torch.diag(torch.logspace(0, -2, 64, dtype=torch.float64)) @ V.T  # condition number 100
    s = torch.linalg.svdvals(newton_schulz_ref(G, steps=10))
    assert s.min() > 0.6 and s.max() < 1.25, f"[{s.min():.3f}, {s.max():.3f}]"


def test_batched_equals_each_matrix(gen):
    G = torch.randn(4, 24, 40, generator=gen)
    want = torch.stack([newton_schulz_ref(g) for g in G])
    torch.testing.assert_close(newton_schulz_ref(G), want, atol=1e-6, rtol=1e-5)


def test_tall_is_transpose_of_wide(gen):
    G = torch.randn(50, 20, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(newton_schulz_ref(G), newton_schulz_ref(G.T).T)


def test_per_step_schedule_equals_repeated_triple(gen):
    G = torch.randn(30, 30, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(newton_schulz_ref(G, 3, [QUINTIC] * 3), newton_schulz_ref(G, 3, QUINTIC))
    cubic = (1.5, -0.5, 0.0)  # classic cubic iteration: converges to exactly orthogonal given enough steps
    s = torch.linalg.svdvals(newton_schulz_ref(G, 60, cubic))
    torch.testing.assert_close(s, torch.ones_like(s), atol=1e-6, rtol=0)


def test_output_dtype_is_input_dtype(gen):
    assert newton_schulz_ref(torch.randn(8, 8, generator=gen).bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("G,kwargs,match", [
    (torch.ones(5), {}, "2D"),
    (torch.ones(2, 2, 2, 2), {}, "2D"),
    (torch.ones(4, 4, dtype=torch.int64), {}, "floating"),
    (torch.ones(4, 4), {"steps": 2, "coefficients": [QUINTIC] * 3}, "coefficients"),
])
def test_bad_input(G, kwargs, match):
    with pytest.raises(ValueError, match=match):
        newton_schulz_ref(G, **kwargs)


# ---- the Triton kernels (kernels/newton_schulz.py) against the reference, through the interpreter ---------

# (dtype, atol, rtol): float32 operands, fp32 accumulation, 5 steps of products of size <= 200.
KERNEL_TOLERANCES = [(torch.float32, 2e-5, 1e-4)]


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype,atol,rtol", KERNEL_TOLERANCES)
@pytest.mark.parametrize("shape", [
    (768, 768),  # realistic: a record-model attention matrix
    (130, 200),  # wide, not a multiple of the 128 tile
    (200, 130),  # tall: runs on the transposed view
    (3, 70, 150),  # batched
    (2, 150, 70),  # batched tall
])
def test_kernel_matches_reference(gen, shape, dtype, atol, rtol):
    G = torch.randn(*shape, generator=gen, dtype=dtype)
    torch.testing.assert_close(nsk.newton_schulz(G), newton_schulz_ref(G), atol=atol, rtol=rtol)


@pytest.mark.interpreter
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_kernel_schedules_match_reference(gen, name):
    coefficients, safety = SCHEDULES[name]
    G = torch.randn(96, 160, generator=gen)
    out = nsk.newton_schulz(G, len(coefficients), coefficients, safety)
    torch.testing.assert_close(out, newton_schulz_ref(G, len(coefficients), coefficients, safety), atol=2e-5, rtol=1e-4)


def test_opcheck(gen, cpu_path):
    """torch.ops.bdiff.newton_schulz: schema and fake implementation, one triple and a per-step schedule."""
    G = torch.randn(2, 40, 24, generator=gen)
    coefficients, safety = SCHEDULES["polar_express"]
    for args in ((G, 5, list(QUINTIC), 0.0), (G, 5, [c for t in coefficients for c in t], safety)):
        torch.library.opcheck(torch.ops.bdiff.newton_schulz.default, args)


@pytest.mark.interpreter
@pytest.mark.parametrize("name,band", [("quintic", (0.6, 1.25)), ("polar_express", (0.75, 1.15))])
@pytest.mark.parametrize("conditioning", ["random", "ill"])
def test_schedule_singular_value_band(gen, name, band, conditioning):
    """Each schedule's promise: quintic lands singular values in about [0.68, 1.13]; Polar Express, fit for
    5 steps, in a band around 1 that is narrower (its last steps converge)."""
    coefficients, safety = SCHEDULES[name]
    G = torch.randn(128, 192, generator=gen)
    if conditioning == "ill":  # condition number 100: after ||G||_F scaling the smallest value is ~3e-3
        U, _ = torch.linalg.qr(torch.randn(128, 128, generator=gen))
        V, _ = torch.linalg.qr(torch.randn(192, 128, generator=gen))
        G = U @ torch.diag(torch.logspace(0, -2, 128)) @ V.T
    s = torch.linalg.svdvals(nsk.newton_schulz(G, len(coefficients), coefficients, safety)).double()
    lo, hi = band
    assert s.min() > lo and s.max() < hi, f"{name}: singular values in [{s.min():.3f}, {s.max():.3f}], want {band}"


@pytest.mark.interpreter
def test_symmetric_kernel_visits_upper_triangle_only(gen):
    T = 5
    G = torch.randn(T * 128 - 7, 700, generator=gen)  # T tiles a side, the last one partial
    work = nsk.count_work(G, steps=1)
    assert work["sym_tiles"] == 2 * T * (T + 1) // 2, "A = X Xᵀ and A·A must each visit T(T+1)/2 tiles"
    assert work["update_tiles"] == T * 6, "the update is a dense (T x cdiv(700, 128)) grid"


@pytest.mark.interpreter
def test_symmetric_flops_at_4096():
    """The issue's bar: the symmetric products do <= 0.55 of the dense FLOPs at 4096². Counted from the
    tile grid the kernel launches (T(T+1)/2 programs, each a 128x128 tile of depth n)."""
    T = 4096 // nsk.kernel_config("sym")["BM"]
    tiles = nsk._upper_tiles(T, "cpu").shape[0]
    assert tiles == T * (T + 1) // 2
    assert tiles * 128 * 128 / 4096**2 <= 0.55


@pytest.mark.parametrize("G,match", [
    (torch.ones(5), "2D"),
    (torch.ones(2, 2, 2, 2), "2D"),
    (torch.ones(4, 4, dtype=torch.int64), "floating"),
    (torch.ones(0, 4), "empty"),
])
def test_kernel_bad_input(G, match):
    with pytest.raises(ValueError, match=match):
        nsk.newton_schulz(G)

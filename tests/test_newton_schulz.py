"""Newton–Schulz orthogonalization: newton_schulz_ref's shapes, schedules and singular-value band."""
import pytest
import torch

from kernels.reference import QUINTIC, newton_schulz_ref


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

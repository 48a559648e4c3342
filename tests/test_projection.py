import torch
import torch.nn.functional as F

from pairfree.projection import project_to_memory


def dense(v, memory, tau):
    t = F.normalize(memory, dim=-1)
    w = torch.softmax(F.normalize(v, dim=-1) @ t.T / tau, dim=-1)
    return F.normalize(w @ t, dim=-1), w


def test_projection_is_a_normalized_convex_combination_of_memory_rows():
    g = torch.Generator().manual_seed(0)
    v, memory = torch.randn(4, 8, generator=g), torch.randn(50, 8, generator=g)
    got = project_to_memory(v, memory, tau=0.1, chunk=7)  # chunked == dense
    expected, w = dense(v, memory, 0.1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert torch.all(w >= 0) and torch.allclose(w.sum(-1), torch.ones(4))
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(4))


def test_projection_tends_to_the_nearest_row_as_tau_goes_to_zero():
    g = torch.Generator().manual_seed(1)
    v, memory = torch.randn(5, 16, generator=g), torch.randn(30, 16, generator=g)
    nearest = F.normalize(memory, dim=-1)[
        (F.normalize(v, dim=-1) @ F.normalize(memory, dim=-1).T).argmax(1)
    ]
    far = (project_to_memory(v, memory, tau=1.0) - nearest).norm(dim=-1)
    near = (project_to_memory(v, memory, tau=1e-4) - nearest).norm(dim=-1)
    assert torch.all(near < 1e-3) and torch.all(far > 10 * near)

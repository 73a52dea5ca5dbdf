"""Helpers shared by several test files (imported as ``helpers``: pytest puts tests/ on the path)."""

import torch
import torch.nn.functional as F


def assert_same_step(a, b, x, y, rtol=1e-5, atol=1e-7):
    """Equal outputs, and gradients equal to the given tolerance, for one cross-entropy step of two models."""
    out_a, out_b = a(x), b(x)
    assert torch.equal(out_a, out_b)
    F.cross_entropy(out_a, y).backward()
    F.cross_entropy(out_b, y).backward()
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=rtol, atol=atol, msg=name)


def random_mixture(k=5, dtype=torch.float64, seed=0, sigma_floor=0.03):
    """A K-component mixture with mu[0] = 0 (the pruning component): means spread over [-0.3, 0.3], sigmas in
    [sigma_floor, sigma_floor + 0.03], unnormalised weights in [0.5, 1.5]."""
    g = torch.Generator().manual_seed(seed)
    rest = torch.linspace(-0.3, 0.3, k - 1) + 0.01 * torch.randn(k - 1, generator=g)
    mu = torch.cat([torch.zeros(1), rest])
    sigma = sigma_floor + 0.03 * torch.rand(k, generator=g)
    pi = 0.5 + torch.rand(k, generator=g)
    return mu.to(dtype), sigma.to(dtype), pi.to(dtype)


def sample_mixture(mu, sigma, pi, n, seed=0, spread=1.0):
    """``n`` weights drawn from the mixture, each component's spread scaled by ``spread``."""
    g = torch.Generator().manual_seed(seed)
    comp = torch.multinomial(pi.abs() / pi.abs().sum(), n, replacement=True, generator=g)
    return mu[comp] + spread * sigma[comp] * torch.randn(n, generator=g, dtype=mu.dtype)


def write_notebook(path, body="pass", params='preset = "smoke"\noutput_dir = ""'):
    """A two-cell notebook at ``path``: ``params`` in the cell tagged ``parameters``, then ``body``."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    cell = nbformat.v4.new_code_cell(params)
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [cell, nbformat.v4.new_code_cell(body)]
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path

"""No host reads of tensor values in a training step (the GPU path: on CUDA each one waits for the GPU).

Counted on CPU by wrapping the Tensor methods that hand a value to Python (``item``, ``int()``, ``float()``,
``bool()``, ``tolist``, ``__index__``) during one train step of every method of the benchmark. What this cannot
see: syncs inside an op with a data-dependent output size (``bincount``/``unique``/``nonzero`` on CUDA).
"""

import collections
import traceback

import pytest
import torch

from benchmarks.run import step_cases
from paperlib.quant import LSQActivation

READS = ("item", "__int__", "__float__", "__bool__", "tolist", "__index__")


@pytest.fixture
def host_reads(monkeypatch):
    seen: collections.Counter = collections.Counter()
    active = [False]

    def wrap(name):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, **kwargs):
            if active[0]:
                frame = traceback.extract_stack(limit=3)[-2]
                seen[f"{name} at {frame.filename}:{frame.lineno}"] += 1
            return original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)

    for name in READS:
        wrap(name)
    return seen, active


@pytest.mark.parametrize("case", list(step_cases()))
def test_a_train_step_reads_no_tensor_value_on_the_host(case, host_reads):
    seen, active = host_reads
    model, loss_fn = step_cases()[case]()
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(16, 3, 8, 8), torch.arange(16) % 10
    for step in range(2):  # the first step may initialise (LSQ's activation step): count the second
        active[0] = step == 1
        opt.zero_grad(set_to_none=True)
        loss_fn(model, x, y).backward()
        opt.step()
    active[0] = False
    assert not seen, dict(seen)


def test_lsq_reads_its_initialised_flag_again_after_a_load():
    act = LSQActivation(4).train()
    act(torch.rand(8, 3) * 2)
    first = act.step.detach().clone()
    act(torch.full((4, 2), 3.0))  # initialised: the step stays
    assert torch.equal(act.step.detach(), first)
    state = {k: v.clone() for k, v in act.state_dict().items()}
    state["initialized"] = torch.tensor(False)
    act.load_state_dict(state)  # a state that is not initialised: the next training batch sets the step
    act(torch.full((4, 2), 3.0))
    assert bool(act.initialized)
    torch.testing.assert_close(act.step.detach(), torch.tensor(2 * 3.0 / 15**0.5))


@pytest.mark.parametrize("check_labels, reads", [(True, 1), (False, 0)])
def test_climbq_homovar_step_reads_at_most_the_label_range(check_labels, reads, host_reads):
    from paperlib.climbq import HomoVarLoss, batch_sigma, set_sigma

    seen, active = host_reads
    model, _ = step_cases()["ClimbQ W4A4"]()
    loss = HomoVarLoss([100, 80, 60, 50, 40, 30, 20, 15, 10, 5], check_labels=check_labels)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(16, 3, 8, 8), torch.arange(16) % 10
    for step in range(2):
        active[0] = step == 1
        opt.zero_grad(set_to_none=True)
        set_sigma(model, batch_sigma(y, 10))
        feats = model.forward_features(x)
        loss(model.fc(feats), y, feats).backward()
        opt.step()
    active[0] = False
    assert sum(seen.values()) == reads, dict(seen)
    with pytest.raises(ValueError, match=r"class ids in \[0, 10\)"):
        HomoVarLoss([5] * 10)(torch.randn(2, 10), torch.tensor([0, 10]), torch.randn(2, 4))

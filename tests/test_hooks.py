"""neurostore.hooks.forward_hooks: reads, replaces (tuple outputs too), pre-hooks, and every handle
removed on exit, on error, and when a name is unknown."""

import pytest
import torch
from torch import nn

from neurostore.hooks import forward_hooks, keep


class Pair(nn.Module):
    """Returns (x * 2, x) like an attention block's (output, weights)."""

    def forward(self, x):
        return x * 2, x


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.pair = Pair()
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        return self.head(self.pair(self.a(x))[0])


def _n_hooks(net):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in net.modules())


@pytest.fixture
def net():
    torch.manual_seed(0)
    return Net().eval()


def test_reads_outputs_and_inputs_without_changing_them(net):
    x = torch.randn(4, 3)  # [batch, features]
    want = net(x)
    got = {}
    with forward_hooks(net, {"a": keep(got, "a"), "pair": keep(got, "pair")}, pre={"head": keep(got, "head_in")}):
        out = net(x)
    assert torch.equal(out, want)
    assert torch.equal(got["a"], net.a(x))
    assert torch.equal(got["pair"], net.a(x) * 2)  # the first element of the tuple output
    assert torch.equal(got["head_in"], got["pair"])
    assert _n_hooks(net) == 0


def test_a_returned_tensor_replaces_the_output_first_element_of_a_tuple_too(net):
    x = torch.randn(4, 3)
    with forward_hooks(net, {"pair": lambda out: torch.zeros_like(out)}):
        assert torch.allclose(net(x), net.head.bias.expand(4, 2))  # the head saw zeros
    with forward_hooks(net, pre={"head": lambda inp: inp * 0}):
        assert torch.allclose(net(x), net.head.bias.expand(4, 2))
    seen = {}
    with forward_hooks(net, {"pair": keep(seen, "whole")}, whole=True):
        net(x)
    assert isinstance(seen["whole"], tuple) and len(seen["whole"]) == 2
    assert _n_hooks(net) == 0


def test_every_handle_is_removed_on_error_and_unknown_names_register_nothing(net):
    with pytest.raises(RuntimeError, match="boom"):
        with forward_hooks(net, {"a": keep({}, "a"), "head": keep({}, "h")}, pre={"head": keep({}, "i")}):
            assert _n_hooks(net) == 3
            raise RuntimeError("boom")
    assert _n_hooks(net) == 0
    with pytest.raises(KeyError, match="no module named 'nope'"):
        with forward_hooks(net, {"a": keep({}, "a"), "nope": keep({}, "n")}):
            pass
    assert _n_hooks(net) == 0

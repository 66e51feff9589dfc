"""weight_sync's in-place load where vLLM's reload_weights takes no tensors (vLLM before 0.18:
it re-reads the checkpoint from disk). No engine: a stand-in model runner."""
import torch

from vllm_compat import weight_sync


class Method:
    """Stands in for a vLLM quant method: counts post-processing calls per layer."""
    def __init__(self):
        self.processed = []

    def process_weights_after_loading(self, layer):
        self.processed.append(layer)


class Model(torch.nn.Module):
    def __init__(self, method):
        super().__init__()
        self.a, self.b = torch.nn.Linear(2, 2, bias=False), torch.nn.Linear(2, 2, bias=False)
        self.a.quant_method = self.b.quant_method = method

    def load_weights(self, weights):  # vLLM models return the names they loaded
        loaded = set()
        for name, tensor in weights:
            self.get_parameter(name).data.copy_(tensor)
            loaded.add(name)
        return loaded


class OldRunner:
    def __init__(self, model):
        self.model = model

    def reload_weights(self) -> None:  # vLLM 0.15.1: from disk only
        raise AssertionError("must not be called")


def test_fallback_loads_and_reprocesses_only_the_loaded_layers():
    method = Method()
    model = Model(method)
    weight_sync.load_in_place(OldRunner(model), {"b.weight": torch.full((2, 2), 3.0)})
    assert torch.equal(model.b.weight, torch.full((2, 2), 3.0))
    assert method.processed == [model.b]


def test_dropped_weights_are_named():
    model = Model(Method())
    assert weight_sync.dropped_weights(model) == []
    model.a.weight = torch.nn.Parameter(torch.empty(0), requires_grad=False)  # what CPU GEMM packing leaves
    assert weight_sync.dropped_weights(model) == ["a"]

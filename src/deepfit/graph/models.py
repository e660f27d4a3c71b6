"""Node-classification models, in their own registry (the names do not clash with the image
models): `gcn`, graph convolutions as in Kipf & Welling (ICLR 2017) through PyTorch Geometric's
GCNConv, and `mlp`, the same layers on the node features alone (the baseline that shows what the
graph adds). Both take (features (N, F), edge_index (2, E)) and return logits (N, K)."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from deepfit.graph.sources import import_pyg
from deepfit.registry import Registry

NODE_MODELS: Registry[Callable[..., nn.Module]] = Registry("node model")


def feature_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Dropout that also takes sparse COO features (Kipf drops the stored values of sparse inputs)."""
    if not training or p == 0.0:
        return x
    if x.is_sparse:
        return torch.sparse_coo_tensor(x.indices(), F.dropout(x.values(), p, True), x.shape, is_coalesced=True, check_invariants=False)
    return F.dropout(x, p, True)


class NodeNet(nn.Module):
    """dropout -> layer -> ReLU -> ... -> dropout -> layer: Kipf's GCN when the layers are graph
    convolutions, a plain MLP when they are Linear layers (which ignore the edges)."""

    def __init__(self, layers: list[nn.Module], *, dropout: float, graph: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.dropout = dropout
        self.graph = graph

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        return self.apply_layer(self.layers[-1], self.embed(x, edge_index), edge_index)

    def embed(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        """The last hidden layer's node embeddings (N, hidden[-1]), after its ReLU."""
        for layer in self.layers[:-1]:
            x = F.relu(self.apply_layer(layer, x, edge_index))
        return x

    def apply_layer(self, layer: nn.Module, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        x = feature_dropout(x, self.dropout, self.training)
        return layer(x, edge_index) if self.graph else layer(x)


def layer_widths(in_features: int, hidden: list[int], num_classes: int) -> list[tuple[int, int]]:
    widths = [in_features, *hidden, num_classes]
    return list(itertools.pairwise(widths))


@NODE_MODELS.register("gcn")
def build_gcn(*, in_features: int, num_classes: int, hidden: list[int], dropout: float, cached: bool = False) -> nn.Module:
    """Graph convolutions (16 hidden units by default: Kipf & Welling's Cora setting). cached:
    normalise the adjacency once (training on one fixed graph); never for export."""
    pyg = import_pyg("torch_geometric.nn", purpose="the gcn node model")
    layers = [pyg.GCNConv(i, o, cached=cached) for i, o in layer_widths(in_features, hidden, num_classes)]
    return NodeNet(layers, dropout=dropout, graph=True)


@NODE_MODELS.register("mlp")
def build_node_mlp(*, in_features: int, num_classes: int, hidden: list[int], dropout: float, cached: bool = False) -> nn.Module:
    """Linear layers on each node's features alone: what a model knows without the graph."""
    layers: list[nn.Module] = [nn.Linear(i, o) for i, o in layer_widths(in_features, hidden, num_classes)]
    return NodeNet(layers, dropout=dropout, graph=False)


def build_node_model(
    name: str, *, in_features: int, num_classes: int, hidden: list[int], dropout: float, cached: bool = False
) -> nn.Module:
    return NODE_MODELS.get(name)(in_features=in_features, num_classes=num_classes, hidden=hidden, dropout=dropout, cached=cached)


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, object]]:
    """Weight decay on the first layer only, as in Kipf & Welling's code (the paper's 5e-4
    regularises the first layer's weights); the later layers train without it."""
    layers = model.layers
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(model).__name__} has no .layers list to group for weight decay")
    first = list(layers[0].parameters())
    rest = [p for layer in layers[1:] for p in layer.parameters()]
    groups: list[dict[str, object]] = [{"params": first, "weight_decay": weight_decay}]
    return groups + ([{"params": rest, "weight_decay": 0.0}] if rest else [])


def list_node_models() -> list[str]:
    return NODE_MODELS.names()

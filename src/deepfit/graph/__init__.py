"""The node-classification task: Planetoid/karate/CSV graphs, gcn/mlp models and graph figures."""

from deepfit.graph.export import NodeExportResult, export_node_checkpoint
from deepfit.graph.inference import NodeEvaluation, NodePredictions, evaluate_node_checkpoint, predict_nodes
from deepfit.graph.models import NODE_MODELS, build_node_model, list_node_models
from deepfit.graph.report import write_node_report
from deepfit.graph.sources import GRAPHS, Graph, build_graph, list_graphs
from deepfit.graph.trained import TrainedNodeModel, load_node_model
from deepfit.graph.training import NodeFitResult, fit_node, graph_of, node_defaults

__all__ = [
    "GRAPHS",
    "NODE_MODELS",
    "Graph",
    "NodeEvaluation",
    "NodeExportResult",
    "NodeFitResult",
    "NodePredictions",
    "TrainedNodeModel",
    "build_graph",
    "build_node_model",
    "evaluate_node_checkpoint",
    "export_node_checkpoint",
    "fit_node",
    "graph_of",
    "list_graphs",
    "list_node_models",
    "load_node_model",
    "node_defaults",
    "predict_nodes",
    "write_node_report",
]

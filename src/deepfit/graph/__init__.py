"""The node-classification task: Planetoid/karate/CSV graphs, gcn/mlp models and graph figures."""

"""The regression task: CSV and embedded sources, linear/mlp models, regression metrics and figures."""

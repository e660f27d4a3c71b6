"""`deepfit serve`: a checkpoint as an HTTP prediction API with dynamic batching and a web page
(an image classifier), or table rows in and values out (a regression model).
fastapi and uvicorn (the `serve` extra) are imported only when a server is built."""

from __future__ import annotations

from deepfit.serve.app import ServeOptions, create_app
from deepfit.serve.model import ServedModel, load_served_model
from deepfit.serve.server import ServeSettings, serve
from deepfit.serve.table import ServedTable, load_served_table

__all__ = ["ServeOptions", "ServeSettings", "ServedModel", "ServedTable", "create_app", "load_served_model", "load_served_table", "serve"]

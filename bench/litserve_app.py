"""The peer of `deepfit serve` in bench/serve.py: a plain LitServe server on the same checkpoint,
decoding uploads with deepfit's decoder and classifying with deepfit's Predictor, batched by
LitServe (max_batch_size / batch_timeout). Bench-only: litserve is the `bench` extra.

    python bench/litserve_app.py CHECKPOINT PORT [--max-batch 32] [--max-wait-ms 5] [--threads 0]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import litserve as ls
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deepfit.predict import Predictor, decode


class DeepfitAPI(ls.LitAPI):  # type: ignore[misc]
    """Module level: LitServe pickles the API into its inference worker process."""

    def __init__(self, checkpoint: str, threads: int, **batching: Any) -> None:
        super().__init__(**batching)
        self.checkpoint = checkpoint
        self.threads = threads

    def setup(self, device: str) -> None:
        self.predictor = Predictor.from_checkpoint(self.checkpoint, device="cpu", threads=self.threads)

    def decode_request(self, request) -> torch.Tensor:  # type: ignore[no-untyped-def]  # no annotation: LitServe then hands over the parsed form
        c, h, w = self.predictor.input_shape
        return decode(request["file"].file.read(), channels=c, size=(h, w))

    def batch(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(inputs)

    def predict(self, images: torch.Tensor) -> list[Any]:
        return self.predictor.classify(images, [None] * images.shape[0], topk=5)

    def unbatch(self, output: list[Any]) -> list[Any]:
        return output

    def encode_response(self, prediction: Any) -> dict[str, Any]:
        return {"predictions": [prediction.to_dict()]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="a plain LitServe server on a deepfit checkpoint")
    parser.add_argument("checkpoint")
    parser.add_argument("port", type=int)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    api = DeepfitAPI(args.checkpoint, args.threads, max_batch_size=args.max_batch, batch_timeout=args.max_wait_ms / 1000)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1, timeout=60)
    server.run(host="127.0.0.1", port=args.port, num_api_servers=1, generate_client_file=False, log_level="warning")


if __name__ == "__main__":
    main()

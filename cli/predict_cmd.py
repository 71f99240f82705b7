"""`maskforge predict`: the most probable classes of image files, from an artifact or an ONNX export."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from maskforge.prediction import predict

from .app import app


@app.command("predict")
def predict_command(
    model: Annotated[Path, typer.Argument(help="An artifact (run in PyTorch) or an exported .onnx file "
                                               "(run in onnxruntime).")],
    images: Annotated[list[Path], typer.Argument(help="Image files (png, jpg, ...), decoded as the data loader "
                                                      "decodes held-out images.")],
    top: Annotated[int, typer.Option(help="Classes to show per image (at most the number of classes).")] = 5,
    threads: Annotated[Optional[int], typer.Option(help="Intra-op threads (default: all cores).")] = None,
    mean: Annotated[Optional[str], typer.Option(help="Per-channel mean, comma-separated (ONNX files without "
                                                     "maskforge metadata).")] = None,
    std: Annotated[Optional[str], typer.Option(help="Per-channel std, comma-separated.")] = None,
    size: Annotated[Optional[int], typer.Option(help="Input image side in pixels (default: the model's).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")] = False,
) -> None:
    """Classify images: the top-5 classes of each, with softmax probabilities.

    Example: maskforge predict runs/conv4/artifact.onnx digit7.png digit3.png --json
    """
    predictions = predict(model, images, top=top, threads=threads, mean=mean, std=std, size=size)
    if as_json:
        typer.echo(json.dumps({"model": str(model), "predictions": [p.to_dict() for p in predictions]}, indent=2))
        return
    table = Table(title=f"maskforge predict: {model}")
    for column, justify in (("image", "left"), ("rank", "right"), ("class", "left"), ("probability", "right"),
                            ("logit", "right")):
        table.add_column(column, justify=justify)
    for prediction in predictions:
        for score in prediction.top:
            table.add_row(prediction.image if score.rank == 1 else "", str(score.rank), score.name,
                          f"{score.probability:.2%}", f"{score.logit:.3f}", end_section=score is prediction.top[-1])
    Console().print(table)

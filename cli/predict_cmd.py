"""`maskforge predict`: the most probable classes of image files, from an artifact or an ONNX export."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from maskforge.errors import MaskforgeError
from maskforge.textguard import MESSAGE_LIMIT, printable

from .app import app
from .console import console
from .shown import cell


@app.command("predict")
def predict_command(
    model: Annotated[
        Path, typer.Argument(help="An artifact (run in PyTorch) or an exported .onnx file (run in onnxruntime).")
    ],
    images: Annotated[
        list[Path],
        typer.Argument(
            help="Image files (png, jpg, ...) or folders (every image under "
            "them, sorted), decoded as the data loader decodes held-out "
            "images."
        ),
    ],
    top: Annotated[int, typer.Option(help="Classes to show per image (at most the number of classes).")] = 5,
    threads: Annotated[Optional[int], typer.Option(help="Intra-op threads (default: all cores).")] = None,
    mean: Annotated[
        Optional[str], typer.Option(help="Per-channel mean, comma-separated (ONNX files without maskforge metadata).")
    ] = None,
    std: Annotated[Optional[str], typer.Option(help="Per-channel std, comma-separated.")] = None,
    size: Annotated[Optional[int], typer.Option(help="Input image side in pixels (default: the model's).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")] = False,
) -> None:
    """Classify images: the top-5 classes of each, with softmax probabilities.

    An image that cannot be decoded is reported (a warning line) and the others are classified; the
    command then exits with code 2.

    Example: maskforge predict runs/conv4/artifact.onnx digit7.png digit3.png --json
    """
    from maskforge.prediction import predict  # torch loads here, after the arguments are checked

    results = predict(model, images, top=top, threads=threads, mean=mean, std=std, size=size, skip_bad=True)
    predictions = [p for p in results if p.error is None]
    failed = [p for p in results if p.error is not None]
    for bad in failed:
        typer.echo(f"warning: {printable(bad.error, limit=MESSAGE_LIMIT)}", err=True)
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "model": str(model),
                    "predictions": [{"image": p.image, "top": p.to_dict()["top"]} for p in predictions],
                    "failed": [{"image": p.image, "error": p.error} for p in failed],
                },
                indent=2,
            )
        )
    else:
        _print_table(model, predictions)
    if failed:
        raise MaskforgeError(
            f"{len(failed)} of {len(results)} images could not be decoded (see the warnings "
            f"above); the other {len(predictions)} are classified"
        )


def _print_table(model: Path, predictions: list) -> None:
    table = Table(title=cell(f"maskforge predict: {model}"))
    for column, justify in (
        ("image", "left"),
        ("rank", "right"),
        ("class", "left"),
        ("probability", "right"),
        ("logit", "right"),
    ):
        table.add_column(column, justify=justify)
    for prediction in predictions:
        for score in prediction.top:
            table.add_row(
                cell(prediction.image) if score.rank == 1 else "",
                str(score.rank),
                cell(score.name),
                f"{score.probability:.2%}",
                f"{score.logit:.3f}",
                end_section=score is prediction.top[-1],
            )
    console().print(table)

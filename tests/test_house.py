"""The house rule of issue 21: no function in pipeline/ over about 60 lines or 6 parameters.

A settings object counts as one parameter; ``self``/``cls`` do not; keyword-only parameters,
``*args`` and ``**kwargs`` do. Lines run from the first decorator to the last line.
"""

from __future__ import annotations

import ast
from pathlib import Path

PIPELINE = Path(__file__).resolve().parent.parent / "pipeline"
MAX_LINES = 60
MAX_PARAMS = 6

# Pending: another engineer is changing these modules now; they are refactored there.
PENDING = {
    ("stages/predict.py", "predict_grid"),
    ("stages/predict.py", "_predict_into"),
}
# Not yet split: known offenders left when the 20:40 deadline of this round came (issue 21);
# each is removed from here when it is split, and the second test keeps this list honest.
NOT_YET: set[tuple[str, str]] = {
    ("calibration.py", "chip_detections"),  # 62 lines, 6 parameters
    ("calibration.py", "fit_calibration"),  # 62 lines, 3 parameters
    ("cli.py", "build_parser"),  # 118 lines, 0 parameters
    ("dataset.py", "__init__"),  # 34 lines, 16 parameters
    ("distributed.py", "run_batch"),  # 62 lines, 7 parameters
    ("distributed.py", "run_items"),  # 22 lines, 9 parameters
    ("layout.py", "for_make"),  # 21 lines, 7 parameters
    ("postprocess.py", "_edge_chip_counts"),  # 20 lines, 8 parameters
    ("postprocess.py", "choose"),  # 99 lines, 10 parameters
    ("runner.py", "_batch"),  # 13 lines, 9 parameters
    ("splitting.py", "_split_by_cores"),  # 24 lines, 7 parameters
    ("stages/batch/__init__.py", "_write_products"),  # 93 lines, 9 parameters
    ("stages/batch/catalog.py", "write_catalog"),  # 77 lines, 8 parameters
    ("stages/batch/merge.py", "merge_cars"),  # 69 lines, 3 parameters
    ("stages/evaluate.py", "evaluate"),  # 76 lines, 4 parameters
    ("stages/rasterize.py", "gap_weights"),  # 46 lines, 7 parameters
    ("stages/rasterize.py", "load_labels"),  # 75 lines, 2 parameters
    ("stages/rasterize.py", "rasterize_scene"),  # 83 lines, 4 parameters
    ("stages/report.py", "_crops_section"),  # 21 lines, 7 parameters
    ("stages/report.py", "plot_crops"),  # 59 lines, 8 parameters
    ("stages/sample/plan.py", "_place_cars"),  # 64 lines, 10 parameters
    ("stages/sample/render.py", "_draw_box"),  # 42 lines, 7 parameters
    ("stages/sample/render.py", "_draw_car"),  # 80 lines, 9 parameters
    ("stages/sample/render.py", "_draw_tree"),  # 39 lines, 12 parameters
    ("stages/sample/render.py", "_ground"),  # 146 lines, 5 parameters
    ("stages/sample/render.py", "_vehicle_roof"),  # 35 lines, 8 parameters
    ("stages/sample/render.py", "render_scene"),  # 101 lines, 9 parameters
    ("stages/sample/writer.py", "make_sample"),  # 67 lines, 3 parameters
    ("stages/train.py", "__init__"),  # 16 lines, 8 parameters
    ("stages/train.py", "_run"),  # 158 lines, 11 parameters
    ("stages/vectorize.py", "vectorize_scene"),  # 67 lines, 3 parameters
    ("stages/vectorize.py", "write_summary"),  # 64 lines, 2 parameters
}


def _params(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    args = node.args
    names = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)]
    if names and names[0] in ("self", "cls"):
        names = names[1:]
    return len(names) + bool(args.vararg) + bool(args.kwarg)


def _lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
    return node.end_lineno - start + 1


def offenders() -> dict[tuple[str, str], tuple[int, int]]:
    found = {}
    for path in sorted(PIPELINE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines, params = _lines(node), _params(node)
                if lines > MAX_LINES or params > MAX_PARAMS:
                    found[(path.relative_to(PIPELINE).as_posix(), node.name)] = (lines, params)
    return found


def test_no_function_over_60_lines_or_6_parameters():
    found = offenders()
    over = {key: size for key, size in found.items() if key not in PENDING | NOT_YET}
    assert over == {}, "(lines, parameters) of functions over the limits: " + repr(over)


def test_the_exemptions_are_still_needed():
    # A function split (or renamed) leaves the lists: they never hide a new offender.
    found = offenders()
    assert sorted((PENDING | NOT_YET) - found.keys()) == []

"""Evaluation of a finished run: identity, expression fidelity, head pose and temporal
stability of an output video against its driving clip and actor photo, as numbers.

Every number names its judge: dlib's ResNet face descriptor and 68-point predictor (independent
of the generator, offline, from `face-recognition-models`), the SMIRK encoder and ArcFace (the
models the method itself uses, labelled as such). Plots and the HTML report are drawn by
`render.report`; this package computes and never draws.

May import: numpy, OpenCV, dlib, `tracking`, `render` (video reading, files, the report), and the
retarget core (weights, motion). The core (pipeline, run, weights) never imports this package;
the CLI is where `retarget run --eval` meets it.
"""

from retarget.evaluate.core import EvalInputs, EvalOptions, EvalResult, evaluate, write_outputs

__all__ = ["EvalInputs", "EvalOptions", "EvalResult", "evaluate", "write_outputs"]

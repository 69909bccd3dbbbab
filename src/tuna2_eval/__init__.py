"""Tuna-2 in evaluation harnesses. lmms-eval finds the `tuna2` model through the `lmms_eval.models` entry point of
this package (setup.cfg), which names [`lmms_eval_manifest`]; the model itself is in `tuna2_eval.lmms_eval_tuna2`,
imported only when lmms-eval loads it."""

LMMS_EVAL_MODEL = "tuna2"


def lmms_eval_manifest():
    """The entry point lmms-eval (0.7+) reads: `--model tuna2` resolves to [`lmms_eval_tuna2.Tuna2`]."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=LMMS_EVAL_MODEL, simple_class_path="tuna2_eval.lmms_eval_tuna2.Tuna2")

"""transformers' common model and configuration tests, run against a tiny Tuna-2.

The mixins come from the transformers source distribution that tests/upstream/run_common_tests.py downloads and
extracts (`TUNA2_UPSTREAM_TESTS`); they are not part of this repository. The file is not named `test_*.py`, so the
project's own suite (`pytest tests`) does not collect it; run it with the script.
"""

import importlib
import os
import sys
import unittest
from unittest import mock

import pytest
from transformers import AutoModel, AutoModelForImageTextToText
from transformers.models.auto import modeling_auto

from transformers_tuna2 import Tuna2Config, Tuna2ForConditionalGeneration, Tuna2Model

if not os.environ.get("TUNA2_UPSTREAM_TESTS"):
    pytest.skip(
        "transformers' common tests are not extracted: run tests/upstream/run_common_tests.py",
        allow_module_level=True,
    )
sys.path.insert(0, os.environ["TUNA2_UPSTREAM_TESTS"])
ConfigTester = importlib.import_module("transformers_tests.test_configuration_common").ConfigTester
ModelTesterMixin = importlib.import_module("transformers_tests.test_modeling_common").ModelTesterMixin

from tuna2_tester import Tuna2ModelTester  # noqa: E402  (next to this file)

# The common tests choose what to check of a class (a loss from labels, a language-modelling head, image features
# for generation) from transformers' built-in model-name mappings. Tuna-2 registers itself with the Auto classes at
# import, which those name mappings do not see: the same registrations are mirrored into them for these tests.
REGISTERED_NAMES = [
    (modeling_auto.MODEL_MAPPING_NAMES, AutoModel._model_mapping[Tuna2Config].__name__),
    (
        modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
        AutoModelForImageTextToText._model_mapping[Tuna2Config].__name__,
    ),
]


class Tuna2ModelTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (Tuna2Model, Tuna2ForConditionalGeneration)
    _is_composite = True
    # The image features are the spans of all images packed into one sequence of slots (each image's time slot
    # and patches): no batch dimension to check; `pooler_output` holds them per image.
    skip_test_image_features_output_shape = True
    # The flow head runs for images to generate only (`image_roles` with TARGET) and the mask token replaces patches
    # only in training with a random ratio above 0: a loss from `labels` leaves both without a gradient.
    test_all_params_have_gradient = False

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.registered_names = [
            mock.patch.dict(names, {Tuna2Config.model_type: name}) for names, name in REGISTERED_NAMES
        ]
        for patch in cls.registered_names:
            patch.start()

    @classmethod
    def tearDownClass(cls):
        for patch in cls.registered_names:
            patch.stop()
        super().tearDownClass()

    def setUp(self):
        self.model_tester = Tuna2ModelTester(self)
        self.config_tester = ConfigTester(self, config_class=Tuna2Config, has_text_modality=False)

    def test_config(self):
        self.config_tester.run_common_tests()

    @unittest.skip(
        "the transformers source distribution ships no tests/generation, so GenerationTesterMixin cannot be "
        "mixed in; generation is tested in tests/test_library_contracts.py and tests/test_modeling_tuna2.py"
    )
    def test_generation_tester_mixin_inheritance(self):
        pass

    @unittest.skip("Tuna-2 has no vision encoder (images enter as patch-convolution embeddings): no hidden states")
    def test_get_image_features_hidden_states(self):
        pass

    @unittest.skip("Tuna-2 has no vision encoder (images enter as patch-convolution embeddings): no attentions")
    def test_get_image_features_attentions(self):
        pass

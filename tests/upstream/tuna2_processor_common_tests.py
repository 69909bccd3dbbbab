"""transformers' common processor tests (`ProcessorTesterMixin`), run against a Tuna-2 processor with a tiny
tokenizer: saving and loading, and the image processor's options reaching it from a processor call (structured and
unstructured keyword arguments, and options saved with the processor).

Like tuna2_common_tests.py, the mixin comes from the transformers source distribution that
tests/upstream/run_common_tests.py extracts (`TUNA2_UPSTREAM_TESTS`); run it with the script.
"""

import importlib
import os
import sys
import unittest

import pytest

from transformers_tuna2 import Tuna2ImageProcessor, Tuna2Processor
from tuna2_training.tiny import build_tokenizer

if not os.environ.get("TUNA2_UPSTREAM_TESTS"):
    pytest.skip(
        "transformers' common tests are not extracted: run tests/upstream/run_common_tests.py",
        allow_module_level=True,
    )
sys.path.insert(0, os.environ["TUNA2_UPSTREAM_TESTS"])
ProcessorTesterMixin = importlib.import_module("transformers_tests.test_processing_common").ProcessorTesterMixin


class Tuna2ProcessorTest(ProcessorTesterMixin, unittest.TestCase):
    processor_class = Tuna2Processor

    @classmethod
    def _setup_tokenizer(cls):
        return build_tokenizer()

    @classmethod
    def _setup_image_processor(cls):
        # 32x32 images: a span of 1 + 2 * 2 slots, so that texts with an image fit the mixin's max_length (76)
        return Tuna2ImageProcessor(size={"height": 32, "width": 32})

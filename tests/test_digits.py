"""The default dataset: scikit-learn's digits, read from the file it ships without importing scikit-learn."""

import subprocess
import sys

import numpy as np
from sklearn.datasets import load_digits as sklearn_load_digits

from data.digits import load_digits
from tests.conftest import ROOT


def test_digits_are_scikit_learns():
    images, labels = load_digits()
    digits = sklearn_load_digits()
    np.testing.assert_array_equal(images, digits.images)
    np.testing.assert_array_equal(labels, digits.target)


def test_loading_the_digits_leaves_scikit_learn_unimported():
    """Importing scikit-learn took ~1 s of every run's start-up, most of a bad value's one-line error."""
    code = "import sys; from data.digits import Digits; Digits(); print('sklearn' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"

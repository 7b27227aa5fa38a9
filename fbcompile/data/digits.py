"""scikit-learn's 8x8 handwritten digits (1,797 images, shipped inside scikit-learn)."""
from __future__ import annotations

from .dataset import Dataset, from_arrays

TEST_FRACTION = 0.25
SPLIT_SEED = 0  # fixed, so every training seed sees the same split


def load_digits_dataset() -> Dataset:
    """The digits as float32 ``(N, 1, 8, 8)`` in [0, 1] (pixel values 0..16 divided by 16).

    The stratified 75/25 train/test split (1,347 / 450) uses a fixed seed, independent of any
    training seed, so results across training seeds are comparable.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(digits.data, digits.target, test_size=TEST_FRACTION,
                                              stratify=digits.target, random_state=SPLIT_SEED)
    return from_arrays("digits", (x_tr, y_tr), (x_te, y_te), input_shape=(1, 8, 8),
                       num_classes=10, scale=16.0)

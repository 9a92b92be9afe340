"""Image preparation against real MNIST framing, and predictions of a real (tiny) Keras model."""

from __future__ import annotations

import warnings
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from tasks.data.images import MAX_PIXELS, ImageError, prepare
from tasks.ml.saved import ModelError
from tasks.serve.predict import Prediction, predict
from tasks.store.artifacts import write_manifest

FORMS = ("rgb_100px", "inverted_jpeg", "rgba_transparent", "uint16", "offcentre_canvas")


@pytest.fixture(scope="module")
def mnist_test(mnist) -> tuple[np.ndarray, np.ndarray]:
    return mnist.x_test, mnist.y_test


@pytest.fixture(scope="module")
def model_file(mnist, tmp_path_factory) -> Path:
    """A softmax regression trained for 2 epochs on 3,000 real MNIST training images, saved as .keras."""
    x = mnist.x_train[:3000].reshape(-1, 784) / np.float32(255)
    y = mnist.y_train[:3000]
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((784,)), keras.layers.Dense(10, activation="softmax")])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(x, y, epochs=2, batch_size=32, verbose=0)
    directory = tmp_path_factory.mktemp("model")
    model.save(directory / "softmax.keras")
    write_manifest(directory, key=directory.name)  # a stored model: predict loads only verified artifacts
    return directory / "softmax.keras"


def save_as(digit: np.ndarray, form: str, directory: Path, name: str) -> Path:
    """Write one 28x28 MNIST digit the way a user's file might look."""
    big = Image.fromarray(digit).resize((100, 100), Image.Resampling.BICUBIC)
    if form == "rgb_100px":
        path, img = directory / f"{name}.png", big.convert("RGB")
    elif form == "inverted_jpeg":
        path, img = directory / f"{name}.jpg", Image.fromarray(255 - np.asarray(big))
    elif form == "rgba_transparent":
        # Black ink whose opacity carries the digit, on a fully transparent background.
        rgba = np.zeros((100, 100, 4), np.uint8)
        rgba[..., 3] = np.asarray(big)
        path, img = directory / f"{name}.png", Image.fromarray(rgba)
    elif form == "uint16":
        path, img = directory / f"{name}.png", Image.fromarray(digit.astype(np.uint16) * 257)
    elif form == "offcentre_canvas":
        canvas = np.full((240, 320), 230, np.uint8)  # grey paper, digit near a corner
        canvas[20:120, 200:300] = 230 - np.asarray(big, dtype=np.float32) * (200 / 255)
        path, img = directory / f"{name}.png", Image.fromarray(canvas)
    else:
        raise ValueError(form)
    img.save(path)
    return path


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def best_shifted_correlation(prepared: np.ndarray, original: np.ndarray) -> float:
    """Correlation allowing a one-pixel offset: centring by centre of mass rounds to whole pixels."""
    img = prepared.reshape(28, 28)
    return max(correlation(np.roll(img, (dy, dx), axis=(0, 1)), original)
               for dy in (-1, 0, 1) for dx in (-1, 0, 1))


@pytest.mark.parametrize("form", FORMS)
def test_prepare_reproduces_mnist_framing(form, mnist_test, tmp_path):
    images, _ = mnist_test
    plain, shifted = [], []
    for i in range(10):
        out = prepare(save_as(images[i], form, tmp_path, f"d{i}"))
        assert out.shape == (784,) and out.dtype == np.float32
        assert out.min() >= 0.0 and out.max() == pytest.approx(1.0, abs=0.05)
        plain.append(correlation(out, images[i]))
        shifted.append(best_shifted_correlation(out, images[i]))
    assert np.mean(plain) > 0.85, plain
    assert min(shifted) > 0.8, shifted


def test_prepare_of_an_original_mnist_digit_is_nearly_identity(mnist_test, tmp_path):
    images, _ = mnist_test
    path = tmp_path / "seven.png"
    Image.fromarray(images[0]).save(path)
    assert correlation(prepare(path), images[0]) > 0.99


def test_prepare_rejects_a_non_image_naming_the_file(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not a picture")
    with pytest.raises(ImageError, match="notes.png: not a readable image"):
        prepare(path)


def test_prepare_rejects_a_missing_file(tmp_path):
    with pytest.raises(ImageError, match="ghost.png: no such file"):
        prepare(tmp_path / "ghost.png")


def test_prepare_rejects_a_blank_image(tmp_path):
    path = tmp_path / "white.png"
    Image.new("L", (50, 50), 255).save(path)
    with pytest.raises(ImageError, match="white.png: blank image"):
        prepare(path)


def test_predict_reads_most_real_digits(model_file, mnist_test, tmp_path):
    images, labels = mnist_test
    paths = [save_as(images[i], FORMS[i % len(FORMS)], tmp_path, f"d{i}") for i in range(20)]
    predictions = predict(model_file, paths)
    assert [p.path for p in predictions] == paths
    assert all(p.error is None and 0.1 < p.probability <= 1.0 for p in predictions)
    correct = sum(p.digit == int(y) for p, y in zip(predictions, labels[:20], strict=True))
    assert correct >= 16, [(p.digit, int(y)) for p, y in zip(predictions, labels[:20], strict=True)]


def test_predict_reports_bad_files_without_failing_the_others(model_file, mnist_test, tmp_path):
    images, labels = mnist_test
    good = save_as(images[0], "inverted_jpeg", tmp_path, "good")
    text = tmp_path / "readme.txt"
    text.write_text("hello\nworld\n")
    missing = tmp_path / "missing.png"
    predictions = predict(model_file, [text, good, missing])
    assert predictions[1] == Prediction(good, int(labels[0]), predictions[1].probability, None)
    # Each prediction names its file; the error says only what is wrong with it.
    for prediction, error in ((predictions[0], "not a readable image"), (predictions[2], "no such file")):
        assert prediction.digit is None and prediction.probability is None and prediction.error == error


def test_predict_with_a_missing_model_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.keras"):
        predict(tmp_path / "nope.keras", [])


def test_prepare_refuses_a_huge_image_before_decoding_it(tmp_path):
    """10000 x 10000 pixels compress to a small PNG but took 3 GB and 12 s to decode; the header alone decides."""
    path = tmp_path / "huge.png"
    Image.new("1", (10_000, 10_000), 1).save(path)
    assert path.stat().st_size < 200_000
    with pytest.raises(ImageError, match=r"huge.png: 10000x10000 pixels is more than predict accepts"):
        prepare(path)
    # The same header with the pixel data cut off: decoding it would fail as truncated, so only the header was read.
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ImageError, match=r"huge.png: 10000x10000 pixels is more than predict accepts"):
        prepare(path)


def test_prepare_accepts_the_largest_allowed_image(tmp_path):
    side = int(MAX_PIXELS**0.5)
    canvas = np.zeros((side, side), np.uint8)
    canvas[side // 3:2 * side // 3, side // 2 - 200:side // 2 + 200] = 255  # a thick "1"
    path = tmp_path / "big.png"
    Image.fromarray(canvas).save(path)
    assert prepare(path).max() == pytest.approx(1.0)


def test_prepare_rejects_non_finite_pixels(tmp_path):
    pixels = np.zeros((28, 28), np.float32)
    pixels[10:18, 12:16] = 1.0
    pixels[0, 0] = np.nan
    path = tmp_path / "float.tif"
    Image.fromarray(pixels, mode="F").save(path)
    with pytest.raises(ImageError, match="float.tif: the image holds NaN or infinite pixel values"):
        prepare(path)


def test_predict_refuses_a_model_that_holds_code(tmp_path):
    directory = tmp_path / "artifact"
    directory.mkdir()
    keras.Sequential([keras.Input((784,)), keras.layers.Lambda(lambda t: t[:, :10])]).save(directory / "m.keras")
    write_manifest(directory, key=directory.name)
    with pytest.raises(ModelError, match="m.keras: refused, the model holds Python code"):
        predict(directory / "m.keras", [])


def test_prepare_refuses_an_image_past_pillows_own_limit_in_one_line(tmp_path):
    path = tmp_path / "enormous.png"
    Image.new("1", (20_000, 10_000), 1).save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no decompression-bomb warning on top of the error
        with pytest.raises(ImageError, match=r"enormous.png: more pixels than predict accepts \(16,777,216 pixels\)"):
            prepare(path)

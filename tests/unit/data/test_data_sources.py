"""Data sources and splits: built-in real data, arrays, tables, image folders, HF datasets from local files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdkit.data import build_data
from kdkit.data.bundle import split_indices
from kdkit.errors import DataError


def test_mnist5k_is_the_real_embedded_data_set():
    b = build_data("builtin", "mnist5k")
    assert (len(b.train), len(b.val), len(b.test)) == (3500, 500, 1000)
    assert b.input_shape == (1, 28, 28) and b.num_classes == 10
    counts = torch.bincount(b.test.labels, minlength=10)
    assert counts.min() == counts.max() == 100  # 500 per class in the file, stratified split


def test_digits_and_normalisation_fitted_on_train_only():
    b = build_data("builtin", "digits")
    assert b.input_shape == (1, 8, 8)
    assert abs(b.train.x.mean().item()) < 1e-4 and abs(b.train.x.std().item() - 1) < 1e-2
    assert abs(b.test.x.mean().item()) > 1e-4  # the test split was not used to fit the normalisation


def test_split_is_deterministic_disjoint_and_stratified():
    y = np.repeat(np.arange(4), 50)
    a = split_indices(y, 0.1, 0.2, seed=3)
    b = split_indices(y, 0.1, 0.2, seed=3)
    c = split_indices(y, 0.1, 0.2, seed=4)
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    assert not np.array_equal(a[2], c[2])
    tr, va, te = a
    assert len(set(tr) | set(va) | set(te)) == 200 and len(tr) + len(va) + len(te) == 200
    assert np.bincount(y[te]).tolist() == [10, 10, 10, 10]


def test_npz_arrays(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(60, 3)).astype(np.float32), y=np.array(["a", "b", "c"] * 20))
    b = build_data("arrays", path=str(tmp_path / "d.npz"))
    assert b.class_names == ["a", "b", "c"] and b.input_shape == (3,)
    np.savez(tmp_path / "bad.npz", inputs=np.zeros((3, 2)))
    with pytest.raises(DataError, match=r"expected arrays named 'x' and 'y'"):
        build_data("arrays", path=str(tmp_path / "bad.npz"))


def test_csv_table_and_its_errors(tmp_path):
    from sklearn.datasets import load_wine

    frame = load_wine(as_frame=True).frame
    frame.to_csv(tmp_path / "wine.csv", index=False)
    b = build_data("csv", path=str(tmp_path / "wine.csv"), label_column="target")
    assert b.num_classes == 3 and b.input_shape == (13,)
    with pytest.raises(DataError, match=r"data.label_column: 'targte' .*did you mean: target"):
        build_data("csv", path=str(tmp_path / "wine.csv"), label_column="targte")
    (tmp_path / "empty.csv").write_text("a,b,label\n")
    with pytest.raises(DataError, match="no rows"):
        build_data("csv", path=str(tmp_path / "empty.csv"))
    frame.assign(target=1).to_csv(tmp_path / "one.csv", index=False)
    with pytest.raises(DataError, match="only one class"):
        build_data("csv", path=str(tmp_path / "one.csv"), label_column="target")


def test_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(12):
            Image.fromarray(rng.integers(0, 255, (10, 14, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    b = build_data("image_folder", path=str(tmp_path), image_size=8)
    assert b.class_names == ["cat", "dog"] and b.input_shape == (3, 8, 8)
    x, y, i = b.train[0]
    assert x.shape == (3, 8, 8) and int(y) in (0, 1) and i == 0
    assert b.train.fingerprint() != b.test.fingerprint()


def test_hf_datasets_from_local_files(tmp_path):
    pytest.importorskip("datasets", reason="the hf extra is not installed")
    rows = ["f1,f2,label"] + [f"{i % 7},{i % 5},{'yes' if i % 2 else 'no'}" for i in range(40)]
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    b = build_data("hf", name="csv", data_files=str(tmp_path / "t.csv"))
    assert b.class_names == ["no", "yes"] and b.input_shape == (2,)


def test_extra_training_examples_from_npz_files_and_folders(tmp_path):
    base = build_data("builtin", "digits")
    folder = tmp_path / "disagreements"
    folder.mkdir()
    x = np.random.default_rng(0).normal(size=(5, 1, 8, 8)).astype(np.float32)
    np.savez(folder / "a.npz", x=x, y=np.array([1, 2, 3, 4, 5]), class_names=np.array(base.class_names))
    np.savez(folder / "b.npz", x=x[:2], y=np.array([0, 9]))
    more = build_data("builtin", "digits", extra_train=[str(folder)])
    assert len(more.train) == len(base.train) + 7
    assert torch.equal(more.train.x[-7:-2], torch.from_numpy(x)) and more.train.labels[-1] == 9
    assert len(more.test) == len(base.test)  # validation and test untouched
    np.savez(tmp_path / "wrong.npz", x=np.zeros((2, 3), np.float32), y=np.array([0, 1]))
    with pytest.raises(DataError, match=r"data.extra_train: .*shape \(3,\); the data has \(1, 8, 8\)"):
        build_data("builtin", "digits", extra_train=[str(tmp_path / "wrong.npz")])
    np.savez(tmp_path / "names.npz", x=x[:1], y=np.array([0]), class_names=np.array(["cat", "dog"]))
    with pytest.raises(DataError, match="was labelled with classes"):
        build_data("builtin", "digits", extra_train=[str(tmp_path / "names.npz")])
    with pytest.raises(DataError, match="not found"):
        build_data("builtin", "digits", extra_train=[str(tmp_path / "nope")])

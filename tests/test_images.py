"""Image classification: the folder-per-class loader and its errors, a tiny random ViT in the torch
engine (every PEFT kind, the class-mean start), a 2-client 1-round federation over the in-memory
transport and through the simulator, and the ONNX Runtime engines' refusal.

Every model here is random-initialised and every image is generated: nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from broker_server.aggregation import head_from_class_means
from broker_server.evaluation import Evaluator
from broker_server.report import validate_report
from broker_server.service import AggregationService, ServiceConfig
from edge_runtime.agent import DeviceAgent
from edge_runtime.config import TrainConfig
from edge_runtime.data import ImageDataset, TextDataset, is_image_folder, load_folder, load_labels, load_split
from edge_runtime.engines.base import require_text
from edge_runtime.errors import ConfigError, DataFormatError
from edge_runtime.families import check_data_task, family_of_dir, model_dims
from edge_runtime.image_data import load_image_split, read_image, write_image_folder
from edge_runtime.peft_specs import AdapterSpec, LoraSpec, PromptSpec
from edge_runtime.transport import InMemoryBroker, InMemoryTransport
from sdk.simulate import Simulation, SimulationConfig
from tests.helpers import IMAGE_CLASSES, pattern_images, write_image_folder_for_tests, write_text_folder
from tests.tiny_model import make_tiny_bert, make_tiny_vit

VIT_LORA = LoraSpec(rank=4, target_modules=("query", "key", "value", "attention.output.dense"))


@pytest.fixture(scope="module")
def vit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_vit(tmp_path_factory.mktemp("vit") / "vit")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_image_folder_for_tests(tmp_path_factory.mktemp("images") / "data")


def _config(model: Path, spec: Any = VIT_LORA, **kw: Any) -> TrainConfig:
    return TrainConfig(peft=spec, model=str(model), num_labels=3, batch_size=8, lr=1e-2, **kw)


# --- the loader --------------------------------------------------------------------------------


def test_an_image_folder_loads_with_its_classes_in_labels_txt_order(images: Path) -> None:
    assert is_image_folder(images)
    train, test = load_folder(images)
    assert isinstance(train, ImageDataset) and isinstance(test, ImageDataset)
    assert train.task == test.task == "image-classification"
    assert train.label_names == test.label_names == IMAGE_CLASSES == load_labels(images)
    assert len(train) == 36 and len(test) == 18
    assert train.label_histogram().tolist() == [12, 12, 12]
    # grey PNGs come back as RGB with three equal channels, pixel for pixel
    first = train.images[int(np.flatnonzero(train.labels == 0)[0])]  # class folders load by name
    assert first.shape == (12, 12, 3) and first.dtype == np.uint8
    np.testing.assert_array_equal(first[:, :, 0], pattern_images(0, 12, seed=0)[0])
    assert (first[:, :, 0] == first[:, :, 2]).all()
    # load_split reads one split; a limit takes a class-stratified sample
    assert load_split(images, "test", limit=6).label_histogram().tolist() == [2, 2, 2]
    small, _ = load_folder(images, train_limit=9, test_limit=3)
    assert small.label_histogram().tolist() == [3, 3, 3]


def test_without_labels_txt_classes_are_the_sorted_class_folders_of_both_splits(tmp_path: Path) -> None:
    grey = np.full((4, 4), 7, dtype=np.uint8)
    for split, classes in (("train", ("cat", "dog")), ("test", ("ant", "dog"))):
        for name in classes:
            (tmp_path / split / name).mkdir(parents=True)
            np.save(tmp_path / split / name / "a.npy", grey)
    (tmp_path / "train" / ".DS_Store").write_text("x")  # dot names are skipped
    train, test = load_folder(tmp_path)
    assert train.label_names == test.label_names == ("ant", "cat", "dog")
    assert train.labels.tolist() == [1, 2] and test.labels.tolist() == [0, 2]
    assert load_split(tmp_path, "test").label_names == ("ant", "cat", "dog")


def test_npy_and_png_images_read_the_same(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    write_image_folder(tmp_path / "png", {"train": (rgb[None], np.array([0]))}, ("a",))
    write_image_folder(tmp_path / "npy", {"train": (rgb[None], np.array([0]))}, ("a",), suffix=".npy")
    a = load_image_split(tmp_path / "png", "train").images[0]
    b = load_image_split(tmp_path / "npy", "train").images[0]
    np.testing.assert_array_equal(a, rgb)
    np.testing.assert_array_equal(b, rgb)


def _folder(tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    write_image_folder(
        folder,
        {s: (pattern_images(0, 2, size=6), np.array([0, 0])) for s in ("train", "test")},
        ("a", "b"),
    )
    return folder


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda f: (f / "train" / "stray.png").write_bytes(b"x"), r"images go in a folder per class"),
        (lambda f: (f / "train" / "a" / "notes.txt").write_text("hi"), r"notes\.txt: not an image file"),
        (
            lambda f: (f / "train" / "a" / "bad.png").write_bytes(b"not a png"),
            r"bad\.png: not a readable image",
        ),
        (lambda f: (f / "train" / "b").mkdir(), r"train/b: class folder holds no images"),
        (lambda f: (f / "train" / "c").mkdir(), r"class folder 'c' is not a class in labels\.txt"),
        (lambda f: (f / "train" / "a" / "deeper").mkdir(), r"a folder inside a class folder"),
        (
            lambda f: np.save(f / "train" / "a" / "float.npy", np.zeros((3, 3), dtype=np.float32)),
            r"float\.npy: a \.npy image must be uint8",
        ),
        (
            lambda f: np.save(f / "train" / "a" / "cube.npy", np.zeros((2, 2, 2, 2), dtype=np.uint8)),
            r"must be height x width",
        ),
        (lambda f: (f / "train.jsonl").write_text(""), r"keep text files or image folders, not both"),
    ],
)
def test_bad_image_folders_name_the_path_and_the_fault(tmp_path: Path, breakage: Any, message: str) -> None:
    folder = _folder(tmp_path)
    load_folder(folder)  # fine before the breakage
    breakage(folder)
    with pytest.raises(DataFormatError, match=message):
        load_folder(folder)


def test_a_missing_split_folder_and_an_empty_split_are_errors(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    for path in (folder / "test" / "a").iterdir():
        path.unlink()
    (folder / "test" / "a").rmdir()
    with pytest.raises(DataFormatError, match=r"no class folders with images in this split"):
        load_folder(folder)
    (folder / "test").rmdir()
    with pytest.raises(DataFormatError, match=r"no test/ folder"):
        load_folder(folder)
    load_split(folder, "train")  # the train split alone still reads
    with pytest.raises(DataFormatError, match=r"not an image file"):
        read_image(folder / "labels.txt")


def test_image_dataset_checks_its_arrays() -> None:
    good = np.zeros((2, 3, 3), dtype=np.uint8)
    data = ImageDataset((good, good, good), np.array([0, 1, 1]), ("x", "y"))
    assert len(data.subset([2, 0])) == 2 and data.subset([2]).labels.tolist() == [1]
    with pytest.raises(ConfigError, match=r"images\[0\] must be a uint8 array"):
        ImageDataset((np.zeros((2, 3), dtype=np.uint8),), np.array([0]), ("x", "y"))
    with pytest.raises(ConfigError, match=r"images\[0\] must be a uint8 array"):
        ImageDataset((np.zeros((2, 3, 3), dtype=np.float32),), np.array([0]), ("x", "y"))
    with pytest.raises(ConfigError, match="images but"):
        ImageDataset((good,), np.array([0, 1]), ("x", "y"))


# --- the torch engine on a tiny ViT ------------------------------------------------------------


@pytest.mark.parametrize("kind", ["lora", "adapter", "prompt"])
def test_every_kind_trains_on_a_tiny_vit(vit: Path, images: Path, kind: str) -> None:
    from edge_runtime.engines.torch_engine import TorchEngine

    spec: Any = {"lora": VIT_LORA, "adapter": AdapterSpec(bottleneck=4), "prompt": PromptSpec(length=4)}[kind]
    engine = TorchEngine(_config(vit, spec), seed=0, threads=1)
    assert engine.task == "image-classification" and engine.model.pooling == "cls"
    frozen = {
        n: p.detach().clone() for n, p in engine.model.encoder.named_parameters() if not p.requires_grad
    }
    before = engine.trainable_state()
    dims = model_dims(json.loads((vit / "config.json").read_text()))
    # the cost model's count is the engine's, and the module's size is the spec's formula
    assert engine.total_params == dims.total_params + sum(v.size for v in before.values())
    assert sum(v.size for v in before.values()) == spec.trainable_params(dims.hidden, dims.layers, 3)
    train, test = load_folder(images)
    engine.train(train, epochs=1, seed=0)
    after = engine.trainable_state()
    assert all(not np.array_equal(before[n], after[n]) for n in before), "every module tensor moves"
    assert all(
        bool((p == frozen[n]).all()) for n, p in engine.model.encoder.named_parameters() if n in frozen
    )
    result = engine.evaluate(test)
    assert 0.0 <= result.accuracy <= 1.0 and len(result.predictions) == len(test)


def test_lora_on_a_tiny_vit_learns_the_patterns(vit: Path, images: Path) -> None:
    from edge_runtime.engines.torch_engine import TorchEngine

    engine = TorchEngine(_config(vit, head_lr=1e-2), seed=0, threads=1)
    train, test = load_folder(images)
    engine.train(train, epochs=8, seed=0)
    assert engine.evaluate(test).accuracy >= 0.9


def test_features_are_the_normalised_class_token_and_the_class_means_use_them(
    vit: Path, images: Path
) -> None:
    import torch

    from edge_runtime.engines.torch_engine import TorchEngine

    engine = TorchEngine(_config(vit), seed=0, threads=1)
    train, _ = load_folder(images)
    pixels = engine._pixels(train)
    assert pixels.shape == (36, 3, 16, 16)  # 12 x 12 images resized to the model's 16 x 16
    with torch.no_grad():
        hidden = engine.model.encoder(pixel_values=pixels).last_hidden_state
    cls = torch.nn.functional.normalize(hidden[:, 0], dim=-1).numpy()
    sums, counts = engine.class_feature_sums(train)
    assert counts.tolist() == [12.0, 12.0, 12.0]
    for c in range(3):
        np.testing.assert_allclose(sums[c], cls[train.labels == c].sum(0), atol=1e-5)


def test_images_of_any_size_are_resized_and_grey_models_read_them(tmp_path: Path) -> None:
    from edge_runtime.engines.torch_engine import TorchEngine

    grey = make_tiny_vit(tmp_path / "grey", channels=1, image_size=8, patch_size=4)
    rng = np.random.default_rng(0)
    sizes = [(5, 9), (8, 8), (20, 13)]
    data = ImageDataset(
        tuple(rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes),
        np.array([0, 1, 2]),
        IMAGE_CLASSES,
    )
    engine = TorchEngine(_config(grey), seed=0, threads=1)
    assert engine._pixels(data).shape == (3, 1, 8, 8)
    engine.train(data, epochs=1, seed=0)


def test_a_preprocessor_config_sets_the_normalisation(tmp_path: Path) -> None:
    from edge_runtime.engines.torch_engine import TorchEngine

    model = make_tiny_vit(tmp_path / "vit", image_size=4, patch_size=2)
    (model / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.0, 0.5, 1.0], "image_std": 0.5})
    )
    white = ImageDataset((np.full((4, 4, 3), 255, dtype=np.uint8),), np.array([0]), IMAGE_CLASSES)
    pixels = TorchEngine(_config(model), seed=0, threads=1)._pixels(white)
    assert pixels[0, :, 0, 0].tolist() == [2.0, 1.0, 0.0]
    (model / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5, 0.5], "image_std": 0.5}))
    with pytest.raises(ConfigError, match="image_mean must be one number or 3"):
        TorchEngine(_config(model), seed=0, threads=1)


def test_texts_and_images_are_refused_by_the_other_kind_of_model(
    tmp_path: Path, vit: Path, images: Path
) -> None:
    from edge_runtime.engines.torch_engine import TorchEngine

    texts, _ = load_folder(write_text_folder(tmp_path / "texts", per_class_train=2))
    pictures, _ = load_folder(images)
    with pytest.raises(
        ConfigError, match=r"holds texts, but model .* is a vit model for image classification"
    ):
        TorchEngine(_config(vit), seed=0, threads=1).train(texts, epochs=1, seed=0)
    bert = make_tiny_bert(tmp_path / "bert")
    spec = LoraSpec(rank=2, target_modules=("query", "value"))
    with pytest.raises(
        ConfigError, match=r"holds images, but model .* is a bert model .*give a ViT model folder"
    ):
        TorchEngine(_config(bert, spec, seq_len=16), seed=0, threads=1).evaluate(pictures)
    check_data_task(family_of_dir(vit), "image-classification")
    with pytest.raises(ConfigError, match="holds texts"):
        check_data_task(family_of_dir(vit), "classification")


def test_the_onnx_runtime_engines_refuse_images_naming_the_torch_engine(vit: Path, images: Path) -> None:
    from edge_runtime.engines.ort_engine import check_ort_support
    from edge_runtime.engines.ort_step_engine import check_step_support

    pictures, _ = load_folder(images)
    with pytest.raises(ConfigError, match="--engine torch"):
        require_text(pictures)
    texts = TextDataset(("a",), np.array([0]), ("x", "y"))
    assert require_text(texts) is texts
    for check, engine in ((check_ort_support, "ort"), (check_step_support, "ort-plain")):
        with pytest.raises(ConfigError, match=r"image classification trains with --engine torch"):
            check(_config(vit, engine=engine))


# --- federated: 2 clients, 1 round -------------------------------------------------------------


def test_two_clients_one_round_over_the_in_memory_transport_with_the_class_mean_start(
    vit: Path, images: Path
) -> None:
    from edge_runtime.engines.torch_engine import TorchEngine

    train, test = load_folder(images)
    cfg = _config(vit, bits=32)
    broker = InMemoryBroker()
    service_cfg = ServiceConfig(
        fleet="img", rounds=1, train=cfg, min_clients=2, expected_clients=2, round_timeout_s=60
    )
    evaluator = Evaluator(cfg, test, seed=0, threads=1)
    initial = evaluator.initial_state()
    service = AggregationService(InMemoryTransport(broker, "server"), service_cfg, evaluator)
    service.start()
    parts = [train.subset(np.arange(i, len(train), 2)) for i in range(2)]
    agents = []
    for i, part in enumerate(parts):
        agent = DeviceAgent(
            f"d{i}",
            "img",
            InMemoryTransport(broker, f"d{i}"),
            part,
            lambda c: TorchEngine(c, seed=0, threads=1),
        )
        agent.on_ready = lambda a: a.run_pending()
        agents.append(agent)
    for agent in agents:
        agent.start()
    service.run()

    assert [r["round"] for r in service.rounds] == [0, 1]
    assert service.rounds[1]["participants"] == 2
    assert service.rejected == []
    # round 0 is the class-mean start: the head built from both devices' pooled CLS features
    engine = TorchEngine(cfg, seed=0, threads=1)
    sums = sum(engine.class_feature_sums(p)[0] for p in parts)
    counts = sum(engine.class_feature_sums(p)[1] for p in parts)
    engine.load_trainable_state({**initial, **head_from_class_means(sums, counts, service_cfg.head_scale)})
    expected = engine.evaluate(test)
    assert service.rounds[0]["accuracy"] == pytest.approx(expected.accuracy)
    assert service.rounds[0]["loss"] == pytest.approx(expected.loss, rel=1e-4)
    # round 1 moved every LoRA B and the head, and the devices end on the published module
    final = service.final_state()
    assert all(not np.array_equal(final[k], initial[k]) for k in final if k.endswith(".lora_B"))
    assert service.rounds[1]["loss"] != service.rounds[0]["loss"]
    for agent in agents:
        assert agent.final_state is not None
        for k, v in final.items():
            np.testing.assert_array_equal(agent.final_state[k], v)


def test_fedpeft_simulate_trains_a_vit_on_an_image_folder(vit: Path, images: Path) -> None:
    config = SimulationConfig(
        data=str(images),
        model=str(vit),
        clients=2,
        rounds=1,
        partition="iid",
        samples_per_client=18,
        test_samples=18,
        bits=8,
        workers=1,
        round_timeout_s=60.0,
        lr=1e-2,
        engine="auto",  # auto is torch for images
    )
    report = Simulation(config).run()
    validate_report(report)
    assert report["rejected"] == []
    assert [r["round"] for r in report["rounds"]] == [0, 1]
    assert report["rounds"][1]["participants"] == 2
    assert all(c["engine"] == "torch" and c["updates_accepted"] >= 1 for c in report["clients"])
    assert sum(c["samples"] for c in report["clients"]) == 36
    assert report["config"]["train"]["seq_len"] == 17  # 16 patches and the class token
    assert report["final"]["accuracy"] == report["rounds"][1]["accuracy"]  # the service evaluated it


@pytest.mark.parametrize("engine", ["ort", "ort-plain", "mixed"])
def test_simulate_refuses_onnx_runtime_engines_for_images(vit: Path, images: Path, engine: str) -> None:
    config = SimulationConfig(data=str(images), model=str(vit), clients=2, rounds=1, engine=engine)
    with pytest.raises(
        ConfigError, match=rf"--engine {engine}: .*image classification trains with --engine torch"
    ):
        Simulation(config).run()


def test_simulate_refuses_a_text_model_for_images(tmp_path: Path, images: Path) -> None:
    bert = make_tiny_bert(tmp_path / "bert")
    config = SimulationConfig(data=str(images), model=str(bert), clients=2, rounds=1, lora_targets=("query",))
    with pytest.raises(ConfigError, match=r"holds images, but model .* is a bert model"):
        Simulation(config).run()


def test_the_peft_export_of_an_image_model_loads_back_as_an_image_classifier(
    vit: Path, tmp_path: Path
) -> None:
    import torch

    from edge_runtime.engines.torch_engine import TorchEngine
    from sdk.export import ModuleSource, export_module, load_exported

    cfg = _config(vit)
    engine = TorchEngine(cfg, seed=0, threads=1)
    source = ModuleSource(engine.trainable_state(), cfg, "a test module")
    exported = load_exported(export_module(source, tmp_path / "out", "peft").out, threads=1)
    assert exported.task == "image-classification"
    assert not (tmp_path / "out" / "tokenizer.json").exists()  # an image model has no tokenizer
    images = [np.full((16, 16, 3), 40 * k, dtype=np.uint8) for k in range(3)]
    with torch.no_grad():
        expected = engine.model(exported.pixels(images))
    assert torch.equal(exported.image_logits(images), expected)

"""Optimised serving variants: exported with Keras' and OpenVINO's own tools, verified against Keras, refused
when they disagree, recorded with their checksums, and listed by `carbot models`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from carbot.cli import main
from model import (
    VARIANT_RUNTIMES,
    ModelRegistry,
    Preprocessing,
    build_classifier,
    export_variants,
    host_supports,
    load_artefact,
    load_predictor,
    read_artefact,
    read_variants,
    save_artefact,
)
from model._artefact import sha256_of
from model._variants import (
    MAX_ACCURACY_DROP,
    MIN_AGREEMENT,
    REFUSED,
    VERIFIED,
    compare,
    generated_images,
    judge,
    keras_forward,
    run_batched,
    variants_dir,
    verify_variants,
)
from tests.conftest import TEST_IMAGE_SIZE, TEST_LABELS


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny model saved without data, with all its variants exported (once for the module)."""
    import keras

    keras.utils.set_random_seed(7)  # one network, so int8's agreement on it is the same figure every run
    root = tmp_path_factory.mktemp("variants")
    registry = ModelRegistry(root)
    network = build_classifier(len(TEST_LABELS), backbone="tiny", image_size=TEST_IMAGE_SIZE)
    preprocessing = Preprocessing(image_size=TEST_IMAGE_SIZE)
    with registry.staging("plain") as directory:
        save_artefact(network, directory, version="plain", labels=TEST_LABELS, backbone="tiny",
                      preprocessing=preprocessing)  # fmt: skip
        export_variants(network, directory, preprocessing=preprocessing, labels=TEST_LABELS)
    registry.activate("plain")
    return registry.path_for("plain")


def test_each_variant_is_exported_checksummed_and_verified_and_a_version_without_data_says_so(exported):
    manifest = read_variants(exported)
    assert manifest is not None and set(manifest.variants) == set(VARIANT_RUNTIMES)
    # No test split was saved with this version: it is verified on generated images, and the manifest says so.
    assert manifest.verified_on["source"].startswith("generated images") and manifest.verified_on["labelled"] is False
    assert manifest.keras["accuracy"] is None
    for name, variant in manifest.variants.items():
        for file, digest in variant.files.items():
            assert sha256_of(variants_dir(exported) / file) == digest, (name, file)
        supported, why = host_supports(name)
        if not supported:  # e.g. bf16 on a CPU without bf16 instructions: it cannot have run here
            assert variant.status == "not run" and why in variant.reason and not variant.verified
            continue
        assert variant.figures["images"] == manifest.verified_on["images"] > 0
        # The status is exactly what the bar says of the figures measured.
        assert (variant.status, variant.reason) == judge(variant.figures), name
    # The fp32 forms compute what Keras computes, to float rounding.
    for name in ("onnxruntime", "openvino-fp32"):
        variant = manifest.variants[name]
        assert variant.status == VERIFIED and variant.figures["agreement"] == 1.0
        assert variant.figures["max_top3_diff"] < 1e-3
    # The base artefact is untouched: its checksum still covers exactly what it did.
    assert read_artefact(exported, verify=True).version == "plain"


def test_int8_quantises_the_convolutions_and_keeps_the_head_in_fp32(exported):
    """The head (the one MatMul) is a small share of the time and decides the answer: it is not quantised."""
    import openvino as ov

    if manifest_status(exported, "openvino-int8") == "failed":
        pytest.skip("no int8 variant could be made on this host")
    network = ov.Core().read_model(str(variants_dir(exported) / "model-int8.xml"))

    def source(value):
        # A max-pool passes int8 values through unchanged: NNCF quantises before it, not after.
        node = value.get_node()
        return source(node.input_value(0)) if node.get_type_name() == "MaxPool" else node

    def fed_by_fake_quantize(op_type: str) -> list[bool]:
        """For each op of `op_type`, whether an input is a FakeQuantize's output (a quantised activation)."""
        return [
            any(source(value).get_type_name() == "FakeQuantize" for value in op.input_values())
            for op in network.get_ordered_ops()
            if op.get_type_name() == op_type
        ]

    assert any(fed_by_fake_quantize("Convolution"))
    assert fed_by_fake_quantize("MatMul") == [False]


def manifest_status(directory: Path, name: str) -> str:
    return read_variants(directory).variants[name].status


def test_a_damaged_variant_is_refused_and_the_report_says_why(exported, tmp_path):
    import onnx
    from onnx import numpy_helper

    directory = tmp_path / "damaged"
    shutil.copytree(exported, directory)
    # Damage the ONNX file's classifier: swap the head's output columns, as a broken exporter might.
    path = variants_dir(directory) / "model.onnx"
    graph = onnx.load(str(path))
    head = next(init for init in graph.graph.initializer
                if len(init.dims) == 2 and init.dims[-1] == len(TEST_LABELS))  # fmt: skip
    weights = numpy_helper.to_array(head)
    head.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(weights[:, ::-1]), head.name))
    onnx.save(graph, str(path))

    keras_model = load_artefact(directory).keras_model
    images = generated_images(64, TEST_IMAGE_SIZE, seed=3)
    reference = run_batched(keras_forward(keras_model), images)
    manifest = verify_variants(directory, reference=reference, images=images, truth=None,
                               verified_on={"source": "generated images (test)", "images": len(images),
                                            "labelled": False}, runtimes=["onnxruntime", "openvino-fp32"])  # fmt: skip
    damaged, intact = manifest.variants["onnxruntime"], manifest.variants["openvino-fp32"]
    assert damaged.status == REFUSED and damaged.figures["agreement"] < MIN_AGREEMENT
    assert "agreement" in damaged.reason
    assert intact.status == VERIFIED
    # What was written is what is read back, and `carbot models` shows the refusal.
    assert read_variants(directory).variants["onnxruntime"].status == REFUSED
    registry_root = tmp_path
    (registry_root / "ACTIVE").write_text("damaged\n")
    text = CliRunner().invoke(main, ["models"], env={"CARBOT_MODEL_REGISTRY": str(registry_root)}).output
    assert "onnxruntime" in text and "kept out of service: top-1 agreement" in text
    assert "openvino-fp32" in text and "serves" in text
    rows = json.loads(CliRunner().invoke(main, ["models", "--json"],
                                         env={"CARBOT_MODEL_REGISTRY": str(registry_root)}).output)  # fmt: skip
    assert rows[0]["variants"]["onnxruntime"]["status"] == REFUSED
    assert rows[0]["variants"]["openvino-fp32"]["agreement"] == 1.0
    # Asked for by name, the refused variant still does not serve.
    predictor = load_predictor(directory, runtime="onnxruntime", max_batch=2)
    assert predictor.runtime != "onnxruntime"
    assert predictor.runtime_choice.skipped["onnxruntime"].startswith("refused at verification: top-1 agreement")


def test_a_variant_that_loses_accuracy_is_refused_even_when_it_mostly_agrees():
    labels = np.arange(200) % 5
    reference = np.eye(5, dtype=np.float32)[labels]  # Keras is right on all 200
    candidate = reference.copy()
    candidate[:2] = np.eye(5, dtype=np.float32)[(labels[:2] + 1) % 5]  # 2 of 200 now wrong: 99 % agreement
    figures = compare(reference, candidate, labels)
    assert figures["agreement"] == 0.99 and figures["accuracy_drop"] == 0.01 > MAX_ACCURACY_DROP
    assert figures["max_top3_diff"] == 1.0
    status, reason = judge(figures)
    assert status == REFUSED and "accuracy" in reason
    # One flip in 200 is within both bars.
    candidate[1] = reference[1]
    assert judge(compare(reference, candidate, labels))[0] == VERIFIED


def test_a_variant_that_cannot_be_exported_is_recorded_as_failed_and_the_version_still_saves(exported, tmp_path):
    directory = tmp_path / "v"
    shutil.copytree(exported, directory, ignore=shutil.ignore_patterns("variants"))

    class Unexportable:  # a "model" whose exporter raises, as one with an unsupported layer would
        def predict_on_batch(self, batch):
            return np.full((len(batch), len(TEST_LABELS)), 1 / len(TEST_LABELS), dtype=np.float32)

        def export(self, *args, **kwargs):
            raise ValueError("this layer has no ONNX equivalent")

    manifest = export_variants(Unexportable(), directory, preprocessing=Preprocessing(image_size=TEST_IMAGE_SIZE),
                               labels=TEST_LABELS, runtimes=["onnxruntime"])  # fmt: skip
    assert manifest.variants["onnxruntime"].status == "failed"
    assert "no ONNX equivalent" in manifest.variants["onnxruntime"].reason
    assert not (variants_dir(directory) / "model.onnx").exists()
    assert read_artefact(directory, verify=True).version == "plain"


def test_the_demo_model_variants_are_verified_on_its_test_split(demo_registry):
    artefact = ModelRegistry(demo_registry).active()
    manifest = read_variants(artefact.path)
    assert manifest is not None
    assert manifest.verified_on["source"] == "test split" and manifest.verified_on["labelled"] is True
    assert manifest.verified_on["images"] == artefact.metrics["test_images"]
    assert manifest.keras["accuracy"] == pytest.approx(artefact.metrics["test_accuracy"], abs=1e-6)
    for name in VARIANT_RUNTIMES:
        variant = manifest.variants[name]
        if host_supports(name)[0]:
            assert (variant.status, variant.reason) == judge(variant.figures), name
            assert variant.figures["accuracy"] is not None
    # The fp32 forms serve on every host that has their runtime.
    assert manifest.variants["onnxruntime"].status == VERIFIED
    assert manifest.variants["openvino-fp32"].status == VERIFIED


def test_a_variant_this_host_cannot_run_is_recorded_as_not_run_without_a_traceback(
    exported, tmp_path, monkeypatch, caplog
):
    """bf16 on a CPU without bf16 instructions is a limit of the host, not a broken variant: one line, no traceback."""
    import model._runtimes

    directory = tmp_path / "no-bf16"
    shutil.copytree(exported, directory)
    # Whatever this CPU has: the host says it cannot run bf16, as most CPU servers without AVX512_BF16 or AMX do.
    supports = model._runtimes.host_supports

    def without_bf16(name: str) -> tuple[bool, str]:
        return (False, "no BF16 here") if name == "openvino-bf16" else supports(name)

    monkeypatch.setattr(model._runtimes, "host_supports", without_bf16)
    keras_model = load_artefact(directory).keras_model
    images = generated_images(16, TEST_IMAGE_SIZE, seed=4)
    reference = run_batched(keras_forward(keras_model), images)
    verified_on = {"source": "generated images (test)", "images": len(images), "labelled": False}
    with caplog.at_level("INFO", logger="model._variants"):
        manifest = verify_variants(directory, reference=reference, images=images, truth=None, verified_on=verified_on,
                                   runtimes=["openvino-fp32", "openvino-bf16"])  # fmt: skip
    bf16 = read_variants(directory).variants["openvino-bf16"]
    assert bf16.status == "not run" and "no BF16 here" in bf16.reason and not bf16.verified
    assert bf16.files == manifest.variants["openvino-bf16"].files and all(bf16.files.values())  # still checksummed
    assert manifest.variants["openvino-fp32"].status == VERIFIED
    assert not any(record.exc_info for record in caplog.records)
    # The worker's choice leaves it out, and says why.
    predictor = load_predictor(directory, runtime="openvino-bf16", warm=False)
    assert predictor.runtime != "openvino-bf16"
    assert "not run" in predictor.runtime_choice.skipped["openvino-bf16"]


def test_exporting_again_replaces_the_files_of_the_model_saved_before(exported, tmp_path):
    import keras

    directory = tmp_path / "again"
    shutil.copytree(exported, directory)
    keras.utils.set_random_seed(8)  # another network than the one whose variants are in the directory
    network = build_classifier(len(TEST_LABELS), backbone="tiny", image_size=TEST_IMAGE_SIZE)
    preprocessing = Preprocessing(image_size=TEST_IMAGE_SIZE)
    save_artefact(network, directory, version="plain", labels=TEST_LABELS, backbone="tiny", preprocessing=preprocessing)
    before = sha256_of(variants_dir(directory) / "model.bin")
    manifest = export_variants(network, directory, preprocessing=preprocessing, labels=TEST_LABELS,
                               runtimes=["openvino-fp32", "openvino-bf16"])  # fmt: skip
    assert sha256_of(variants_dir(directory) / "model.bin") != before
    assert manifest.variants["openvino-fp32"].status == VERIFIED
    assert manifest.variants["openvino-fp32"].figures["agreement"] == 1.0
    assert set(manifest.variants) == {"openvino-fp32", "openvino-bf16"}

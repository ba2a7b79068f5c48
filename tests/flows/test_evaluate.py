"""Evaluation of the artifact the edge runs: the metric math equals ultralytics' own, and the whole of
evaluate_onnx (the edge agent's detector on a YOLO split) agrees with ``YOLO(onnx).val(rect=False)``."""

from __future__ import annotations

import numpy as np
import pytest

from flows.training.evaluate import (
    CONFUSION_CONF,
    IOU_THRESHOLDS,
    average_precision,
    confusion_counts,
    evaluate_onnx,
    label_path,
    match_predictions,
    read_data_yaml,
    split_images,
    summarize,
)


def _random_boxes(rng: np.random.Generator, n: int) -> np.ndarray:
    xy = rng.uniform(0, 200, (n, 2))
    wh = rng.uniform(10, 60, (n, 2))
    return np.concatenate([xy, xy + wh], axis=1)


def test_average_precision_equals_ultralytics_ap_per_class():
    metrics = pytest.importorskip("ultralytics.utils.metrics")
    rng = np.random.default_rng(0)
    n, nc = 400, 4
    tp = rng.random((n, 10)) < np.linspace(0.8, 0.2, 10)
    conf = rng.random(n)
    pred_cls = rng.integers(0, nc, n)
    target_cls = rng.integers(0, nc - 1, 150)  # the last class has predictions but no instances
    ours, instances = average_precision(tp, conf, pred_cls, target_cls, nc)
    theirs = metrics.ap_per_class(tp, conf, pred_cls, target_cls)
    ap, classes = theirs[5], theirs[6]
    np.testing.assert_allclose(ours[classes], ap, rtol=0, atol=1e-12)
    assert instances[nc - 1] == 0 and not ours[nc - 1].any()


def test_matching_equals_ultralytics_validator():
    torch = pytest.importorskip("torch")
    from ultralytics.models.yolo.detect.val import DetectionValidator

    validator = DetectionValidator()
    rng = np.random.default_rng(1)
    for _ in range(20):
        truth, preds = _random_boxes(rng, 8), _random_boxes(rng, 15)
        preds[:5] = truth[:5] + rng.normal(0, 4, (5, 4))  # some close matches at every IoU level
        true_cls, pred_cls = rng.integers(0, 3, 8), rng.integers(0, 3, 15)
        pred_cls[:5] = true_cls[:5]
        ours = match_predictions(preds, pred_cls, truth, true_cls)
        from edgeloop.matching import box_iou

        iou = torch.from_numpy(box_iou(truth, preds))
        theirs = validator.match_predictions(torch.from_numpy(pred_cls), torch.from_numpy(true_cls), iou).numpy()
        np.testing.assert_array_equal(ours, theirs)


def test_summary_of_a_perfect_and_a_hopeless_model():
    truth = np.array([[0, 0, 10, 10], [20, 20, 40, 40]], dtype=float)
    classes = np.array([0, 1])
    perfect = summarize("m", "test", ["a", "b"], [(truth, classes, np.array([0.9, 0.8]), truth, classes)] * 3)
    assert perfect.map50 == pytest.approx(1.0, abs=0.01) and perfect.map50_95 == pytest.approx(1.0, abs=0.01)
    assert perfect.confusion == [[3, 0, 0], [0, 3, 0], [0, 0, 0]] and perfect.precision == perfect.recall == 1.0
    swapped = summarize("m", "test", ["a", "b"], [(truth, classes[::-1], np.array([0.9, 0.8]), truth, classes)])
    assert swapped.map50_95 == 0.0 and swapped.confusion == [[0, 1, 0], [1, 0, 0], [0, 0, 0]]
    assert [c.instances for c in swapped.per_class] == [1, 1]


def test_confusion_counts_misses_false_positives_and_weak_detections():
    matrix = np.zeros((3, 3), dtype=np.int64)
    truth = np.array([[0, 0, 10, 10], [50, 50, 60, 60]], dtype=float)
    preds = np.array([[0, 0, 10, 10], [100, 100, 120, 120], [50, 50, 60, 60]], dtype=float)
    conf = np.array([0.9, 0.9, CONFUSION_CONF / 2])  # the third is below the operating point: ignored
    confusion_counts(matrix, preds, np.array([0, 1, 1]), conf, truth, np.array([0, 1]))
    assert matrix.tolist() == [[1, 0, 0], [0, 0, 1], [0, 1, 0]]  # a hit, a false positive b, a missed b


def test_splits_and_labels_of_a_yolo_data_set(tmp_path):
    from edgeloop.synth.scenarios import get_scenario
    from edgeloop.synth.scenes import write_dataset

    data = write_dataset(
        tmp_path / "d", get_scenario("shapes").updated(width=64, height=48), n=10, seed=0, test_fraction=0.2
    )
    spec = read_data_yaml(data)
    assert spec.names == ["circle", "square", "triangle"] and set(spec.splits) == {"train", "val", "test"}
    test = split_images(data, "test")
    assert [p.name for p in test] == ["000008.jpg", "000009.jpg"]
    assert label_path(test[0]) == tmp_path / "d" / "labels" / "test" / "000008.txt"
    (tmp_path / "rel").mkdir()
    (tmp_path / "rel" / "data.yaml").write_text("path: ../d\ntrain: images/train\nval: images/val\nnames: [a]\n")
    assert read_data_yaml(tmp_path / "rel" / "data.yaml").splits["val"] == [(tmp_path / "d" / "images" / "val")]


@pytest.mark.slow
def test_evaluate_onnx_agrees_with_ultralytics_val(tmp_path, shapes_release, ultralytics_offline):
    """Same model, same split: the edge detector's mAP matches ultralytics' ONNX validation.

    Like for like: images of the model's input size (ultralytics' val shrinks larger ones with
    INTER_AREA, the edge detector, like ultralytics' predict, with INTER_LINEAR), and ultralytics' val
    keeping one label per box as a device does (its default NMS keeps several: multi-label adds
    true positives no device reports, here +0.014 mAP50, printed). mAP50 then agrees to the last
    digit; mAP50-95 within 0.01 (box coordinates at IoU 0.95 differ in float rounding).
    """
    from ultralytics.models.yolo.detect.val import DetectionValidator
    from ultralytics.utils import nms

    from edgeloop.synth.scenarios import get_scenario
    from edgeloop.synth.scenes import write_dataset

    class OneLabelPerBox(DetectionValidator):
        def postprocess(self, preds):  # noqa: ANN001, ANN202 - ultralytics' signature
            outputs = nms.non_max_suppression(
                preds,
                self.args.conf,
                self.args.iou,
                nc=0,
                multi_label=False,
                agnostic=self.args.single_cls or self.args.agnostic_nms,
                max_det=self.args.max_det,
                end2end=self.end2end,
            )
            return [{"bboxes": x[:, :4], "conf": x[:, 4], "cls": x[:, 5], "extra": x[:, 6:]} for x in outputs]

    world = get_scenario("shapes").updated(width=320, height=240)
    data = write_dataset(tmp_path / "d", world, n=40, seed=21, val_fraction=0.1, test_fraction=0.5)
    ours = evaluate_onnx(shapes_release.onnx, data, "test")
    results = {}
    for name, validator in (("one label", OneLabelPerBox), ("multi-label", None)):
        results[name] = ultralytics_offline.YOLO(str(shapes_release.onnx), task="detect").val(
            validator=validator,
            data=str(data),
            split="test",
            imgsz=320,
            batch=1,
            rect=False,
            plots=False,
            device="cpu",
            verbose=False,
            project=str(tmp_path / "val"),
        )
    for name, r in results.items():
        print(f"ultralytics ({name}): mAP50 {r.box.map50:.4f}, mAP50-95 {r.box.map:.4f}")
    print(f"evaluate_onnx: mAP50 {ours.map50:.4f}, mAP50-95 {ours.map50_95:.4f}")
    assert ours.images == 20 and ours.map50_95 > 0.3  # a model that works, so the comparison means something
    theirs = results["one label"].box
    assert ours.map50 == pytest.approx(theirs.map50, abs=1e-3)
    assert ours.map50_95 == pytest.approx(theirs.map, abs=0.01)
    assert len(IOU_THRESHOLDS) == 10 and ours.metrics()["map50_95"] == ours.map50_95

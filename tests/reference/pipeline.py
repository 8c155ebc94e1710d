#!/usr/bin/env python3
"""The reference pipelines end to end, as their own users run them, for
tests/reference_pipeline.rs: one JSON line per image on stdout.

    pipeline.py classify MODEL.onnx LABELS.txt IMAGE...
        torchvision-style: Pillow decode (turned upright by exif_transpose), Resize(256) (Pillow bilinear, antialiased),
        CenterCrop(224), (x - 127) / 128 (EfficientNet-Lite), onnxruntime, softmax.
        -> {"label": ..., "prob": ...}
    pipeline.py detect MODEL.onnx CONF IOU MAX IMAGE...
        Ultralytics-style: cv2.imread (which applies the EXIF orientation), LetterBox(640) (INTER_LINEAR, pad 114), RGB / 255,
        onnxruntime, boxes above CONF, per-class NMS at IOU (cv2.dnn.NMSBoxesBatched),
        at most MAX, scaled back to the image (scale_boxes) and clipped.
        -> {"detections": [[class_id, conf, x1, y1, x2, y2], ...]}
One intra-op thread, CPU provider.
"""
import json
import sys

import numpy as np
import onnxruntime as ort


def session(path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def classify(model, labels, images):
    from PIL import Image, ImageOps

    names = [l.strip() for l in open(labels, encoding="utf-8") if l.strip()]
    sess = session(model)
    name = sess.get_inputs()[0].name
    for path in images:
        img = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
        w, h = img.size
        nw, nh = (256, int(256 * h / w)) if w <= h else (int(256 * w / h), 256)
        img = img.resize((nw, nh), Image.Resampling.BILINEAR)
        top, left = int(round((nh - 224) / 2.0)), int(round((nw - 224) / 2.0))
        img = img.crop((left, top, left + 224, top + 224))
        x = (np.asarray(img, dtype=np.float32) - 127.0) / 128.0
        x = x.transpose(2, 0, 1)[None]
        logits = sess.run(None, {name: x})[0].reshape(-1).astype(np.float64)
        p = np.exp(logits - logits.max())
        p /= p.sum()
        i = int(p.argmax())
        print(json.dumps({"label": names[i], "prob": float(p[i])}))


def detect(model, conf, iou, max_det, images):
    import cv2

    sess = session(model)
    name = sess.get_inputs()[0].name
    for path in images:
        im0 = cv2.imread(path, cv2.IMREAD_COLOR)
        h0, w0 = im0.shape[:2]
        r = min(640 / h0, 640 / w0)
        new_unpad = int(round(w0 * r)), int(round(h0 * r))
        dw, dh = (640 - new_unpad[0]) / 2, (640 - new_unpad[1]) / 2
        im = im0
        if (w0, h0) != new_unpad:
            im = cv2.resize(im0, new_unpad, interpolation=cv2.INTER_LINEAR)
        top, bottom = int(round(dh - 0.1)), int(round(dh + 0.1))
        left, right = int(round(dw - 0.1)), int(round(dw + 0.1))
        im = cv2.copyMakeBorder(im, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(114, 114, 114))
        x = (im[..., ::-1].astype(np.float32) / 255.0).transpose(2, 0, 1)[None]
        y = sess.run(None, {name: np.ascontiguousarray(x)})[0][0]  # (4 + classes, anchors)
        y = y.T
        scores = y[:, 4:]
        cls = scores.argmax(1)
        best = scores.max(1)
        keep = best > conf
        boxes, best, cls = y[keep, :4], best[keep], cls[keep]
        xyxy = np.stack([boxes[:, 0] - boxes[:, 2] / 2, boxes[:, 1] - boxes[:, 3] / 2,
                         boxes[:, 0] + boxes[:, 2] / 2, boxes[:, 1] + boxes[:, 3] / 2], 1)
        out = []
        if len(best):
            xywh = [[float(a), float(b), float(c - a), float(d - b)] for a, b, c, d in xyxy]
            idx = cv2.dnn.NMSBoxesBatched(xywh, best.tolist(), cls.tolist(), conf, iou)
            idx = sorted(np.array(idx).reshape(-1).tolist(), key=lambda i: -best[i])[:max_det]
            # ultralytics.utils.ops.scale_boxes: the letterbox's pad and gain, then clip.
            pad_x = round((640 - w0 * r) / 2 - 0.1)
            pad_y = round((640 - h0 * r) / 2 - 0.1)
            for i in idx:
                x1, y1, x2, y2 = xyxy[i]
                x1, x2 = [min(max((v - pad_x) / r, 0), w0) for v in (x1, x2)]
                y1, y2 = [min(max((v - pad_y) / r, 0), h0) for v in (y1, y2)]
                out.append([int(cls[i]), float(best[i]), float(x1), float(y1), float(x2), float(y2)])
        print(json.dumps({"detections": out}))


def main():
    a = sys.argv[1:]
    if a[0] == "classify":
        classify(a[1], a[2], a[3:])
    elif a[0] == "detect":
        detect(a[1], float(a[2]), float(a[3]), int(a[4]), a[5:])
    else:
        sys.exit(f"unknown command {a[0]}")


if __name__ == "__main__":
    main()

"""The Python peer: the same job as ai-edge-inference, written the way a Python team writes it.

One file: paho-mqtt in, Pillow decode and resize, numpy preprocessing, onnxruntime, numpy
post-processing (softmax/top-k or YOLO decode + NMS), a JSON result out. Frames are raw
JPEG payloads on `edge-ai/<bu>/<facility>/<gateway>/camera/snapshots`; results go to
`edge-ai/<bu>/<facility>/<gateway>/ai/inference/vision`. Installed from PyPI:
paho-mqtt, onnxruntime, pillow, numpy.

    python3 peer.py --model yolov12n --onnx models/.cache/yolov12n.onnx --port 1883 --threads 2
"""
import argparse
import io
import json
import time

import numpy as np
import onnxruntime as ort
import paho.mqtt.client as mqtt
from PIL import Image

p = argparse.ArgumentParser()
p.add_argument("--model", choices=["yolov12n", "efficientnet-lite0"], required=True)
p.add_argument("--onnx", required=True)
p.add_argument("--labels", default="models/imagenet-labels.txt")
p.add_argument("--host", default="127.0.0.1")
p.add_argument("--port", type=int, default=1883)
p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: onnxruntime's default)")
args = p.parse_args()

opts = ort.SessionOptions()
if args.threads:
    opts.intra_op_num_threads = args.threads
session = ort.InferenceSession(args.onnx, sess_options=opts, providers=["CPUExecutionProvider"])
input_name = session.get_inputs()[0].name
if args.model == "yolov12n":
    names = eval(session.get_modelmeta().custom_metadata_map["names"])  # "{0: 'person', ...}"
else:
    names = dict(enumerate(open(args.labels).read().splitlines()))


def letterbox(img, size=640):
    w, h = img.size
    r = min(size / w, size / h)
    nw, nh = round(w * r), round(h * r)
    canvas = Image.new("RGB", (size, size), (114, 114, 114))
    left, top = (size - nw) // 2, (size - nh) // 2
    canvas.paste(img.resize((nw, nh), Image.BILINEAR), (left, top))
    x = np.asarray(canvas, dtype=np.float32) / 255.0
    return x.transpose(2, 0, 1)[None], r, left, top


def nms(boxes, scores, iou=0.45):
    order = scores.argsort()[::-1]
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        xx1 = np.maximum(boxes[i, 0], boxes[order[1:], 0])
        yy1 = np.maximum(boxes[i, 1], boxes[order[1:], 1])
        xx2 = np.minimum(boxes[i, 2], boxes[order[1:], 2])
        yy2 = np.minimum(boxes[i, 3], boxes[order[1:], 3])
        inter = np.clip(xx2 - xx1, 0, None) * np.clip(yy2 - yy1, 0, None)
        area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
        o = inter / (area(boxes[i]) + area(boxes[order[1:]]) - inter + 1e-9)
        order = order[1:][o <= iou]
    return keep


def detect(img):
    x, r, left, top = letterbox(img)
    out = session.run(None, {input_name: x})[0][0].T  # [8400, 84]
    scores = out[:, 4:]
    cls = scores.argmax(1)
    conf = scores[np.arange(len(cls)), cls]
    m = conf > 0.25
    xywh, cls, conf = out[m, :4], cls[m], conf[m]
    boxes = np.stack([xywh[:, 0] - xywh[:, 2] / 2, xywh[:, 1] - xywh[:, 3] / 2,
                      xywh[:, 0] + xywh[:, 2] / 2, xywh[:, 1] + xywh[:, 3] / 2], 1)
    preds = []
    for c in np.unique(cls):
        idx = np.where(cls == c)[0]
        for k in nms(boxes[idx], conf[idx]):
            b = (boxes[idx[k]] - [left, top, left, top]) / r
            preds.append({"class_id": int(c), "label": names[int(c)], "confidence": float(conf[idx[k]]),
                          "bbox": [round(float(v), 1) for v in b]})
    preds.sort(key=lambda d: -d["confidence"])
    return preds[:100]


def classify(img):
    w, h = img.size
    s = 256 / min(w, h)
    img = img.resize((round(w * s), round(h * s)), Image.BILINEAR)
    w, h = img.size
    left, top = round((w - 224) / 2), round((h - 224) / 2)
    img = img.crop((left, top, left + 224, top + 224))
    x = (np.asarray(img, dtype=np.float32) - 127.0) / 128.0
    logits = session.run(None, {input_name: x.transpose(2, 0, 1)[None]})[0][0]
    e = np.exp(logits - logits.max())
    prob = e / e.sum()
    top = prob.argsort()[::-1][:5]
    return [{"class_id": int(i), "label": names[int(i)], "confidence": float(prob[i])} for i in top]


def on_message(client, userdata, msg):
    t0 = time.perf_counter()
    img = Image.open(io.BytesIO(msg.payload)).convert("RGB")
    t1 = time.perf_counter()
    preds = detect(img) if args.model == "yolov12n" else classify(img)
    t2 = time.perf_counter()
    bu, facility, gateway = msg.topic.split("/")[1:4]
    result = {
        "message_type": "ai_inference_result",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device_id": msg.topic,
        "model_name": args.model,
        "backend_used": "onnxruntime-python",
        "inference_time_ms": (t2 - t1) * 1000,
        "predictions": preds,
        "metadata": {"decode_time_ms": (t1 - t0) * 1000, "image_width": img.width, "image_height": img.height,
                     "source": {"topic": msg.topic}},
    }
    client.publish(f"edge-ai/{bu}/{facility}/{gateway}/ai/inference/vision", json.dumps(result), qos=1)


def on_connect(client, userdata, flags, reason, properties):
    client.subscribe("edge-ai/+/+/+/camera/snapshots", qos=1)
    print("ready", flush=True)


client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"python-peer-{args.model}")
client.on_connect = on_connect
client.on_message = on_message
client.connect(args.host, args.port)
client.loop_forever()

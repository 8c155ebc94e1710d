#!/usr/bin/env python3
"""The reference pipelines' resize, for tests/preprocess_reference.rs.

    preprocess.py crop   FILTER SHORT SIZE IN.png OUT.bin   # torchvision: Resize(SHORT) + CenterCrop(SIZE) on PIL
    preprocess.py letterbox       SIZE       IN.png OUT.bin   # Ultralytics LetterBox (OpenCV INTER_LINEAR, pad 114)
    preprocess.py decode IN.jpg OUT.png [WxH|transpose]     # Pillow's (libjpeg-turbo's) decode, as a lossless PNG

OUT.bin is the resized RGB image, uint8, height x width x 3: the tensor before
normalisation. The torchvision steps are written out (size and crop rounding as
torchvision.transforms.functional does them) so the test needs Pillow, not torch.
"""
import sys

import numpy as np


def crop(filt, short, size, src, dst):
    from PIL import Image

    resample = {
        "bilinear-antialias": Image.Resampling.BILINEAR,
        "bicubic": Image.Resampling.BICUBIC,
        "area": Image.Resampling.BOX,
        "nearest": Image.Resampling.NEAREST,
    }[filt]
    img = Image.open(src).convert("RGB")
    w, h = img.size
    # torchvision _compute_resized_output_size: the long side is truncated.
    if w <= h:
        nw, nh = short, int(short * h / w)
    else:
        nw, nh = int(short * w / h), short
    img = img.resize((nw, nh), resample)
    # torchvision center_crop: int(round(...)), Python's round (half to even).
    top = int(round((nh - size) / 2.0))
    left = int(round((nw - size) / 2.0))
    img = img.crop((left, top, left + size, top + size))
    np.asarray(img, dtype=np.uint8).tofile(dst)


def letterbox(size, src, dst):
    import cv2

    im = cv2.imread(src, cv2.IMREAD_COLOR)
    h, w = im.shape[:2]
    # ultralytics.data.augment.LetterBox (auto=False, scaleup=True, center=True).
    r = min(size / h, size / w)
    new_unpad = int(round(w * r)), int(round(h * r))
    dw, dh = (size - new_unpad[0]) / 2, (size - new_unpad[1]) / 2
    if (w, h) != new_unpad:
        im = cv2.resize(im, new_unpad, interpolation=cv2.INTER_LINEAR)
    top, bottom = int(round(dh - 0.1)), int(round(dh + 0.1))
    left, right = int(round(dw - 0.1)), int(round(dw + 0.1))
    im = cv2.copyMakeBorder(im, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(114, 114, 114))
    np.ascontiguousarray(im[..., ::-1]).astype(np.uint8).tofile(dst)


def decode(src, dst, size=None):
    """Pillow's decode as a lossless PNG, optionally resized (LANCZOS) or transposed to make odd sizes."""
    from PIL import Image

    img = Image.open(src).convert("RGB")
    if size == "transpose":
        img = img.transpose(Image.Transpose.TRANSPOSE)
    elif size:
        w, h = (int(v) for v in size.split("x"))
        img = img.resize((w, h), Image.Resampling.LANCZOS)
    img.save(dst)


def main():
    a = sys.argv[1:]
    if a[0] == "crop":
        crop(a[1], int(a[2]), int(a[3]), a[4], a[5])
    elif a[0] == "letterbox":
        letterbox(int(a[1]), a[2], a[3])
    elif a[0] == "decode":
        decode(a[1], a[2], a[3] if len(a) > 3 else None)
    else:
        sys.exit(f"unknown command {a[0]}")


if __name__ == "__main__":
    main()

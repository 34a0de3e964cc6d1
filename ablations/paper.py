"""The paper's published numbers (Liu & Zhu, CVPR 2018), as data. Reports set ours beside these.

mAP: ImageNet VID minival, mAP@0.5. Params in millions, MACs as printed (Table 3: millions,
Tables 4-5: billions), latency in ms on a Pixel 2 (Snapdragon 835).
"""
from __future__ import annotations

# paper Table 2: alpha=1, a single Bottleneck-LSTM after the named layer -> mAP
TABLE2_MAP = {
    "none": 50.3, "conv3": 49.1, "conv13": 53.5, "fm1": 51.0, "fm2": 50.5, "fm3": 50.8, "fm4": 51.0, "outputs": 51.2,
}

# paper Table 3: recurrent layer after conv13 -> (mAP, params M, MACs M) of the recurrent layer only
TABLE3 = {
    (0.5, "averaging"): (37.6, None, None),
    (0.5, "lstm"): (43.3, 2.11, 135.0),
    (0.5, "gru"): (44.5, 1.59, 102.0),
    (0.5, "bottleneck_lstm"): (42.8, 0.15, 5.6),
    (1.0, "averaging"): (50.7, None, None),
    (1.0, "lstm"): (53.5, 8.41, 840.0),
    (1.0, "gru"): (54.0, 6.33, 632.0),
    (1.0, "bottleneck_lstm"): (53.5, 0.60, 34.0),
}

# paper Table 4: Bottleneck-LSTM placements -> {alpha: (mAP, params M, MACs B)}
TABLE4 = [
    (("conv13",), {0.5: (42.8, 0.81, 0.19), 1.0: (53.5, 3.01, 1.12)}),
    (("conv13", "conv13"), {0.5: (42.9, 0.91, 0.20), 1.0: (53.3, 3.41, 1.16)}),
    (("conv13", "fm1"), {0.5: (43.3, 0.82, 0.19), 1.0: (53.7, 3.07, 1.13)}),
    (("conv13", "fm1", "fm2"), {0.5: (43.5, 0.82, 0.19), 1.0: (54.0, 3.11, 1.13)}),
    (("conv13", "fm1", "fm2", "fm3"), {0.5: (43.8, 0.85, 0.19), 1.0: (54.4, 3.21, 1.13)}),
    (("conv13", "fm1", "fm2", "fm3", "fm4"), {0.5: (43.8, 0.86, 0.19), 1.0: (54.4, 3.24, 1.13)}),
]

# paper Table 5: model -> (mAP, params M, MACs B); `ours` = Bottleneck-LSTMs after conv13 and fm1..fm4
TABLE5 = {
    "resnet101_faster_rcnn": (62.5, 63.2, 143.37),
    "inception_ssd": (56.3, 13.7, 3.79),
    ("mobilenet_ssd", 1.0): (50.3, 4.20, 1.20),
    ("lstm_ssd", 1.0): (54.4, 3.24, 1.13),
    ("mobilenet_ssd", 0.5): (40.0, 1.17, 0.20),
    ("lstm_ssd", 0.5): (43.8, 0.86, 0.19),
}
FINAL_PLACEMENT = ("conv13", "fm1", "fm2", "fm3", "fm4")  # "our final model" (paper Sec. 4.2)
INPUT_SIZE = {1.0: 320, 0.5: 256}  # paper Sec. 4.1

# paper Table 6: occlusion probability p -> mAP
TABLE6 = {
    "inception_ssd": {0.25: 43.3, 0.50: 34.6, 0.75: 25.9},
    ("mobilenet_ssd", 1.0): {0.25: 43.0, 0.50: 33.8, 0.75: 24.6},
    ("lstm_ssd", 1.0): {0.25: 49.1, 0.50: 42.4, 0.75: 33.3},
    ("mobilenet_ssd", 0.5): {0.25: 33.2, 0.50: 26.0, 0.75: 19.3},
    ("lstm_ssd", 0.5): {0.25: 39.8, 0.50: 33.9, 0.75: 25.6},
}

# paper Table 7: Pixel 2 single-thread latency (big core ms, LITTLE core ms)
TABLE7 = {
    "inception_ssd": (1020, 2170),
    ("mobilenet_ssd", 1.0): (357, 794),
    ("lstm_ssd", 1.0): (322, 665),
    ("mobilenet_ssd", 0.5): (72, 157),
    ("lstm_ssd", 0.5): (65, 140),
}

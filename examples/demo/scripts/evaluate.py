"""Score a model: the share of values within one spread of the mean."""

import json
import sys

model_path, data_path, target = sys.argv[1:4]
with open(model_path) as handle:
    model = json.load(handle)
with open(data_path) as handle:
    next(handle)
    values = [float(line.split(",")[1]) for line in handle if line.strip()]
inside = sum(abs(v - model["mean"]) <= model["stdev"] for v in values)
with open(target, "w") as out:
    out.write(f"{inside / len(values):.4f}\n")

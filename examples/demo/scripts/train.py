"""'Train' a model: the mean and spread of the values (deterministic, so runs compare)."""

import json
import statistics
import sys

source, target = sys.argv[1], sys.argv[2]
with open(source) as handle:
    next(handle)
    values = [float(line.split(",")[1]) for line in handle if line.strip()]
model = {"mean": round(statistics.fmean(values), 6), "stdev": round(statistics.pstdev(values), 6)}
with open(target, "w") as out:
    json.dump(model, out, sort_keys=True)
print(f"trained on {len(values)} values: {model}")

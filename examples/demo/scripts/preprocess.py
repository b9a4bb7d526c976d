"""Drop malformed rows and scale the value column to [0, 1]."""

rows = []
with open(snakemake.input[0]) as handle:  # noqa: F821 (injected by Snakemake)
    header = handle.readline().strip().split(",")
    for line in handle:
        parts = line.strip().split(",")
        if len(parts) == len(header) and parts[1].replace(".", "", 1).isdigit():
            rows.append((parts[0], float(parts[1])))
top = max(value for _, value in rows) or 1.0
with open(snakemake.output[0], "w") as out:  # noqa: F821
    out.write("id,value\n")
    for key, value in rows:
        out.write(f"{key},{value / top:.6f}\n")
with open(snakemake.log[0], "w") as log:  # noqa: F821
    log.write(f"kept {len(rows)} rows\n")

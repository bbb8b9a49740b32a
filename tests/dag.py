"""Reading Snakemake's plan: the job counts of a run's or dry run's "Job stats" block."""

import re


def planned(output: str) -> dict[str, int]:
    """Jobs per rule that `output` (Snakemake's stdout + stderr) plans; {} when nothing is to be done."""
    if "Nothing to be done" in output:
        return {}
    stats = output.split("Job stats:")[1].split("\n\n")[0]
    jobs = {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", stats, re.M)}
    jobs.pop("total", None)
    return jobs

"""Writing a study's results: the one CSV writer the scripts in tests/ share (their files are in
tests/studies/results/)."""
import csv


def write_rows(path, columns, rows):
    """Write ``rows`` (dicts keyed by ``columns``) to the CSV file ``path``, replacing it, and say
    so."""
    path.parent.mkdir(exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    print("wrote", path)

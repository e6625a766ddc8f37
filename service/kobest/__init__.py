"""KoBEST's five lm-evaluation-harness tasks, read offline from the published KoBEST v1.0 TSV files.

The YAML files beside this module are lm-eval 0.4.13's own kobest_* task files (same prompts, choices, metrics,
and lm-eval's own prompt functions by reference) with one change: the rows come from `load()` below instead of the
`skt/kobest_v1` hub data set, which cannot be downloaded here. `tests/test_kobest.py` holds them equal to lm-eval's.

The data directory is, in order: the `kobest_dir` key of lm-eval's `--metadata`, `$POLYGLOT_KOBEST_DIR`,
`../shared/data/kobest` beside the repository. The files are read verbatim (no stripping, brackets around WiC's
target word kept, as in the hub set); only column names and label encodings are mapped to the hub set's.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

TASK_DIR = Path(__file__).parent
ENV = "POLYGLOT_KOBEST_DIR"
TASKS = ("kobest_boolq", "kobest_copa", "kobest_hellaswag", "kobest_sentineg", "kobest_wic")
# Test rows of each task in KoBEST v1.0 (and in the hub set lm-eval reads): a file cut short is refused.
TEST_ROWS = {"kobest_boolq": 1404, "kobest_copa": 1000, "kobest_hellaswag": 500, "kobest_sentineg": 397,
             "kobest_wic": 1260}


def _truth(value: str) -> int:
    """BoolQ's and WiC's answers are written True/TRUE/False/FALSE; the hub set's label is 1/0."""
    v = value.strip().lower()
    if v not in ("true", "false"):
        raise ValueError(f"not a KoBEST truth value: {value!r}")
    return int(v == "true")


# task -> (folder, row of the TSV (a dict by header) -> the hub set's row)
_MAPS = {
    "kobest_boolq": ("BoolQ", lambda r: {"paragraph": r["Text"], "question": r["Question"],
                                         "label": _truth(r["Answer"])}),
    "kobest_copa": ("COPA", lambda r: {"premise": r["sentence"], "question": r["question"],
                                       "alternative_1": r["1"], "alternative_2": r["2"],
                                       "label": int(r["Answer"]) - 1}),
    "kobest_hellaswag": ("HellaSwag", lambda r: {"context": r["context"],
                                                 **{f"ending_{i}": r[f"choice{i}"] for i in range(1, 5)},
                                                 "label": int(r["label"])}),
    "kobest_sentineg": ("SentiNeg", lambda r: {"sentence": r["Text"], "label": int(r["Label"])}),
    "kobest_wic": ("WiC", lambda r: {"word": r["Target"], "context_1": r["SENTENCE1"],
                                     "context_2": r["SENTENCE2"], "label": _truth(r["ANSWER"])}),
}


def data_dir(kobest_dir: str | os.PathLike | None = None) -> Path:
    candidates = [kobest_dir, os.environ.get(ENV), Path(__file__).resolve().parents[3] / "shared" / "data" / "kobest"]
    for c in candidates:
        if c:
            path = Path(c)
            if not path.is_dir():
                raise FileNotFoundError(f"KoBEST data directory {path} does not exist")
            return path
    raise FileNotFoundError("no KoBEST data directory")  # unreachable: the last candidate is always set


def read_rows(task: str, split: str, kobest_dir=None) -> list[dict]:
    """One split of one task as the hub set's rows. The files are tab-separated with no quoting (texts hold quote
    characters), some with CRLF line ends."""
    folder, row = _MAPS[task]
    path = data_dir(kobest_dir) / folder / f"{split}.tsv"
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader)
        rows = []
        for n, fields in enumerate(reader, start=2):
            if len(fields) != len(header):
                raise ValueError(f"{path}:{n}: {len(fields)} fields, the header has {len(header)}")
            rows.append(row(dict(zip(header, fields))))
    if split == "test" and len(rows) != TEST_ROWS[task]:
        raise ValueError(f"{path}: {len(rows)} rows, KoBEST v1.0 has {TEST_ROWS[task]}")
    return rows


def load(task: str, kobest_dir=None):
    """The task's train and test splits as a `datasets.DatasetDict` (what lm-eval's task code reads). KoBEST's
    validation split is not in the published files; lm-eval evaluates the test split and draws few-shot examples
    from train, as with the hub set."""
    import datasets

    return datasets.DatasetDict({split: datasets.Dataset.from_list(read_rows(task, split, kobest_dir))
                                 for split in ("train", "test")})


# custom_dataset hooks named in the YAML files: lm-eval calls them with the task's metadata (version, and whatever
# --metadata carries) as keyword arguments.
def boolq(kobest_dir=None, **_):
    return load("kobest_boolq", kobest_dir)


def copa(kobest_dir=None, **_):
    return load("kobest_copa", kobest_dir)


def hellaswag(kobest_dir=None, **_):
    return load("kobest_hellaswag", kobest_dir)


def sentineg(kobest_dir=None, **_):
    return load("kobest_sentineg", kobest_dir)


def wic(kobest_dir=None, **_):
    return load("kobest_wic", kobest_dir)


def task_manager(kobest_dir=None):
    """lm-eval's TaskManager with these task files taking the place of its hub-reading kobest_* tasks."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASK_DIR), metadata={"kobest_dir": str(data_dir(kobest_dir))})

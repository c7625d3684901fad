"""Rows of data read through the optional Hugging Face `datasets` package (`pip install parallel-r1[data]`): a
directory written by `save_to_disk`, or a local .csv / .arrow file. Offline only: hub access is switched off
before `datasets` is imported and no hub name is ever passed, so a path that is not there fails here, not on
the network. JSONL and parquet never need it (curriculum/data.py reads them directly).
"""
from __future__ import annotations

import os
import tempfile

HF_FORMATS = (".csv", ".arrow")  # files read through `datasets` (JSONL and parquet are read without it)
_BUILDERS = {".csv": "csv", ".arrow": "arrow"}


def import_datasets(path: str):
    """The `datasets` module, offline; ImportError naming `path` and the install command when it is missing."""
    os.environ["HF_DATASETS_OFFLINE"] = "1"  # read when datasets is first imported
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import datasets
    except ImportError:
        raise ImportError(f"reading {path} needs the `datasets` package: pip install 'parallel-r1[data]' (or "
                          "pip install datasets); JSONL and parquet files are read without it") from None
    datasets.disable_progress_bars()
    return datasets


def load_hf_dataset(path: str):
    """The datasets.Dataset at `path`: a save_to_disk directory of one split, or a .csv / .arrow file. ValueError
    for a directory of several splits (naming them: point at one, e.g. <dir>/train) or one that is not a
    `datasets` directory."""
    datasets = import_datasets(path)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "dataset_dict.json")):
            splits = sorted(e for e in os.listdir(path) if os.path.isdir(os.path.join(path, e)))
            raise ValueError(f"{path} holds the splits {splits} (a DatasetDict); point at one of them, e.g. "
                             f"{os.path.join(path, splits[0] if splits else 'train')}")
        if not os.path.isfile(os.path.join(path, "state.json")):
            raise ValueError(f"{path} is a directory but not one written by datasets' save_to_disk (no state.json); "
                             "point at a .jsonl / .parquet / .csv file, or save the dataset with save_to_disk")
        try:
            return datasets.load_from_disk(path)
        except Exception as e:  # a damaged or foreign directory: say so in one line
            raise ValueError(f"{path}: datasets.load_from_disk failed ({type(e).__name__}: {e})") from None
    builder = _BUILDERS[os.path.splitext(path)[1].lower()]
    try:  # datasets converts the file into an arrow cache; a temporary one, kept in memory: a run writes nothing
        with tempfile.TemporaryDirectory() as cache:  # outside its run_dir
            return datasets.load_dataset(builder, data_files=os.path.abspath(path), split="train", cache_dir=cache,
                                         keep_in_memory=True)
    except Exception as e:
        raise ValueError(f"{path}: datasets could not read it as {builder} ({type(e).__name__}: {e})") from None


def hf_rows(path: str, limit: int | None = None):
    """Yield ("row i", dict) for the first `limit` rows (all when None) of the dataset at `path`."""
    dataset = load_hf_dataset(path)
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    for i, row in enumerate(dataset):
        yield f"row {i}", row

"""Dataset readers: one module per dataset family, each turning local files or hub splits into a DatasetBundle.

Every family module offers ``load_local(folder, options)`` (a folder of the local data directory) and
``load_hub(options)`` (the Hugging Face hub); :mod:`aflora.data.registry` names them and decides which one
runs. ``local_file`` reads any csv/tsv/jsonl/json/parquet file as a classification dataset. What the readers
share (hub access, checked labels and columns) lives in ``common``.
"""

"""Corpus embedding jobs: a whole data source embedded with a served model by every worker at once, written as
Parquet parts plus a manifest (``services/corpus/parts.py`` is the on-disk contract other code reads)."""

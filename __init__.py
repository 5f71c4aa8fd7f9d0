"""thresher: curate raw instruction corpora into Parquet datasets for SFT and KD.

The repository root is the package; its folders are the subpackages
(``thresher.flows``, ``thresher.selectors``, ``thresher.generators``,
``thresher.filters``, ``thresher.schemas``).
"""

__version__ = "0.1.0"

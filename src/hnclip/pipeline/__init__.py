"""Pipeline plumbing, apart from the science: the validated config, the grid's cells and their paths, the adapter
every workflow script runs through, the warm job server and the resource estimate.

The science layers (``hnclip.data``, ``train``, ``evaluate``, ``llava``, ``report``, ``losses``, ``models``)
import nothing from here but the grid's path helpers, so they stay usable without Snakemake.
"""

"""The feature store and its contracts: datasets, backbones, Zarr store, manifest (no torch).

Dataset registry and annotation parsers, the backbone registry, the store with its manifest,
verify/inspect, importers, the shared errors and atomic I/O.
"""

"""Frozen open_clip, once per video: frame sampling, last-k block tokens of both towers, the job.

PyAV decode with the reference's ffmpeg graph in-process, the backbone, the pipelined resumable
extraction job and its dask fan-out; the embedded sample lives in ``extract/sample/``.
"""

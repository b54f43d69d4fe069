"""atlas-distill: distill a teacher model into a smaller student with GKD, on Atlas SDK traces.

The Python API of the upstream docs lives in its modules (imported lazily, so
`import atlas_distill` stays light): `atlas_distill.gkd.AtlasGKDTrainer` and
`GKDConfig`, `atlas_distill.data.build_gkd_dataset`, and
`atlas_distill.evaluate.compute_baseline_summary`.
"""

__version__ = "0.1.0"

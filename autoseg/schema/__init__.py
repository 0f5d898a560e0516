"""The artifacts' data models, at the bottom of the import graph: plans (:mod:`~autoseg.schema.plans`), the
fingerprint (:mod:`~autoseg.schema.fingerprint`) and the selection (:mod:`~autoseg.schema.selection`), each a
dataclass loaded from JSON with every key checked (:mod:`~autoseg.schema.records`)."""

"""The dataset doctor: the scan of every file (:mod:`.scan`), the diagnoses of mask encodings
(:mod:`.diagnose`) and the repairs of what they find (:mod:`.fix`)."""

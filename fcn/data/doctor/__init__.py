"""The dataset doctor: the scan of every file (:mod:`.scan`), the diagnoses of mask encodings
(:mod:`.diagnose`), the repairs of what they find into a copy (:mod:`.fix`), the crop against the
images (:mod:`.crop`) and the commands it prints, carrying the user's data settings (:mod:`.commands`)."""

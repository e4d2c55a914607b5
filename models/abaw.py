"""What the ABAW challenges define, shared by the models and the pipeline: the tasks, the
expression classes and action units in their file order, and the sentinels that mark a label
invalid (-5 for valence/arousal, -1 for an expression or AU).

Every expression set is a prefix of :data:`EXPRESSIONS`, so a class keeps its ABAW index in every
set: ``abaw8`` is ABAW's eight classes, ``basic7`` the seven basic emotions without Other.
"""

from __future__ import annotations

TASKS = ("va", "expr", "au")
EXPRESSIONS = ("Neutral", "Anger", "Disgust", "Fear", "Happiness", "Sadness", "Surprise", "Other")
AUS = ("AU1", "AU2", "AU4", "AU6", "AU7", "AU10", "AU12", "AU15", "AU23", "AU24", "AU25", "AU26")
VA_PARTS = ("valence", "arousal")  # the two columns of ``va``
TASK_SIZES = {"va": len(VA_PARTS), "expr": len(EXPRESSIONS), "au": len(AUS)}  # outputs per frame
INVALID = {"va": -5.0, "expr": -1, "au": -1}
EXPRESSION_SETS = {"abaw8": EXPRESSIONS, "basic7": EXPRESSIONS[:7]}

"""The one label that marks a position without loss: prompt tokens, padding, observations, the
targets past a document's end. -100 is torch's `cross_entropy` ignore_index default and the value
HF datasets and TRL use, so label files written elsewhere mean the same here."""

IGNORE = -100

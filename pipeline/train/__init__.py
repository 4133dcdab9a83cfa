"""δ-mem training: the SFT trainer (:mod:`.trainer`) and the backbone/train stages (:mod:`.run`)."""

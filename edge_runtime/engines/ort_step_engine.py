"""WIP"""
STEP_INPUTS = ("input_ids", "attention_mask", "labels")
STEP_OUTPUTS = ("loss", "logits", "features")
GRAD_PREFIX = "grad."

"""Everything PEFT-specific: the one mirror of PEFT's key layout and name matching (layout), reading adapters
(read), building and verifying adapter configs (keys, config), writing adapter folders (write) and the task type
of a base model (task)."""

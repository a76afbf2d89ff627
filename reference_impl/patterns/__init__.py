"""One module per pattern, the naive form beside the optimized one."""

"""What every engine's backend shares: the policy driver, the squared-norm reads, the wide payload that keeps a
number exact through a low-precision all-reduce, and the loss-scaler step."""

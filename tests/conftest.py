"""Test-wide setup. Its presence puts tests/ on sys.path (pytest's default "prepend" import mode), so
test modules and spawned worker processes can `import megatron_cpu, distributed_utils`."""

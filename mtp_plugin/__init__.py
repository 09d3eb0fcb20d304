"""mtp_plugin: DeepSeek-V3-style multi-token prediction for Megatron-Core and DeepSpeed.

`mtp_plugin.core` is framework-free PyTorch; the adapters (`mtp_plugin.megatron`,
`mtp_plugin.deepspeed`) import their host framework lazily so that the core stays usable without them.
"""

__version__ = "0.1.0"

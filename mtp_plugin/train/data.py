"""Batches from Megatron indexed datasets through Megatron-Core's GPTDataset.

The sample order is a pure function of (seed, dataset, sequence length): iteration `it` reads samples
[it * global_batch, (it + 1) * global_batch) of the train split; each data-parallel rank takes a
`micro_batch_size` slice of every `micro_batch_size x dp` block, as Megatron-LM's
MegatronPretrainingSampler does. The data position of a run is therefore just its consumed samples,
which makes resuming exact. Every evaluation scores the same first `eval_iters` global batches of the
validation split, so validation losses are comparable across a run.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from mtp_plugin.config import DataConfig, ModelConfig, TrainingConfig


@dataclass(frozen=True)
class _TokenInfo:
    """What GPTDataset asks of a tokenizer: the EOD id and the vocabulary size (no text is tokenized here)."""

    eod: int
    vocab_size: int

    @property
    def unique_identifiers(self) -> dict:
        # Part of GPTDataset's cache key for its sample indices.
        return {"class": "IndexedTokens", "eod": self.eod, "vocab_size": self.vocab_size}


def _split_bounds(split: str, num_sequences: int) -> list[tuple[int, int]]:
    """[begin, end) sequence range of train, valid and test as Megatron cuts them from one dataset
    (blended_megatron_dataset_config.convert_split_vector_to_split_matrix and
    BlendedMegatronDatasetBuilder._build_megatron_dataset_splits: normalised weights, rounded bookends)."""
    weights = [float(w) for w in split.split(",")]
    total = sum(weights)
    bounds, start = [], 0.0
    for weight in weights:
        end = start + weight / total
        bounds.append((int(round(start * num_sequences)), int(round(end * num_sequences))))
        start = end
    return bounds


def check_datasets(data: DataConfig, model: ModelConfig, *, scan_tokens: bool = True) -> list[str]:
    """Check every dataset file before any process group exists; return notices for the log.

    ValueError (one line naming the field and the file) if a `.bin`/`.idx` pair is empty, truncated or
    inconsistent, if a split that will be read cannot fill one sample of `model.seq_length + 1` tokens
    (Megatron's GPTDataset would loop forever counting epochs of an empty split), or if a token id
    exceeds `model.vocab_size` (scan_tokens=False skips that pass over each `.bin`). An empty
    `data.valid_prefix` is not an error: validation is turned off (`data.valid_prefix` becomes None)
    and a notice says so.
    """
    from mtp_plugin.data.indexed import read_index

    indexes = {}
    for name in ("prefix", "train_prefix", "valid_prefix"):
        prefix = getattr(data, name)
        if prefix:
            try:
                indexes[name], _ = read_index(prefix)
            except ValueError as err:
                raise ValueError(f"data.{name}={prefix}: {err}") from None
    if scan_tokens:  # before the sizes: a corpus of another tokenizer is the more telling finding
        check_token_range(data, model)
    need = model.seq_length + 1  # GPTDataset reads one extra token per sample for the shifted labels
    notices: list[str] = []
    for name, lengths in indexes.items():
        prefix = getattr(data, name)
        if name == "valid_prefix" and not lengths.sum():
            data.valid_prefix = None
            notices.append(
                f"no validation: data.valid_prefix={prefix} holds no documents; training without evaluation"
            )
            continue
        if name == "prefix":
            # Train and valid are read (the test split never is); a zero weight means "not read".
            weights = [float(w) for w in data.split.split(",")]
            bounds = _split_bounds(data.split, len(lengths))
            ranges = [(split, *bounds[i]) for i, split in enumerate(("train", "valid")) if weights[i] > 0]
        else:
            ranges = [("train" if name == "train_prefix" else "valid", 0, len(lengths))]
        for split, lo, hi in ranges:
            tokens = int(lengths[lo:hi].sum())
            if tokens < need:
                fix = (
                    f"give more documents or change data.split={data.split!r} (e.g. '100,0,0' to train without validation)"
                    if name == "prefix"
                    else "give more text or lower model.seq_length"
                )
                raise ValueError(
                    f"data.{name}={prefix}: the {split} split holds {tokens} tokens ({hi - lo} of {len(lengths)} "
                    f"documents), fewer than one sample of model.seq_length + 1 = {need}; {fix}"
                )
    if not data.has_validation and not notices:
        notices.append(
            "no validation split (data.valid_prefix=null or a zero valid weight in data.split): training without evaluation"
        )
    return notices


def check_token_range(data: DataConfig, model: ModelConfig) -> None:
    """ValueError if a dataset holds a token id outside the model's vocabulary (`model.vocab_size`).

    Such an id would index past the embedding table or score a label the head cannot predict; the loss
    rejects it too, but only once training runs. One memory-mapped pass over each `.bin`.
    """
    from mtp_plugin.data.indexed import max_token_id

    for name in ("prefix", "train_prefix", "valid_prefix"):
        prefix = getattr(data, name)
        top = max_token_id(prefix) if prefix else -1
        if top >= model.vocab_size:
            raise ValueError(
                f"data.{name}={prefix} holds token id {top} but model.vocab_size={model.vocab_size}; the data "
                f"was tokenized with a larger vocabulary: set model.vocab_size to that tokenizer's size "
                f"(> {top}) or re-tokenize the data with the model's tokenizer"
            )


def build_datasets(
    data: DataConfig, model: ModelConfig, training: TrainingConfig, *, seed: int
) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset | None]:
    """Build (train, valid) GPTDatasets; call on every rank after torch.distributed is initialised."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    num_train = training.train_iters * training.global_batch_size
    num_valid = training.eval_iters * training.global_batch_size if data.has_validation else 0
    split_kwargs: dict = {}
    if data.prefix:
        split_kwargs = dict(blend=([data.prefix], None), split=data.split)
    else:
        split_kwargs = dict(
            blend_per_split=[
                ([data.train_prefix], None),
                ([data.valid_prefix], None) if data.valid_prefix else None,
                None,
            ]
        )
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=model.seq_length,
        tokenizer=_TokenInfo(eod=data.eod_id, vocab_size=model.vocab_size),
        reset_position_ids=data.reset_position_ids,
        reset_attention_mask=data.reset_attention_mask,
        eod_mask_loss=data.eod_mask_loss,
        # Only per-document attention needs an explicit mask; otherwise the causal mask is implicit.
        create_attention_mask=data.reset_attention_mask,
        path_to_cache=data.cache_dir,
        **split_kwargs,
    )
    if data.prefix:
        # The test split is never read; left in, an empty one (a small corpus, the default 969,30,1)
        # makes GPTDataset count epochs of 0 tokens forever (gpt_dataset._get_num_epochs). Train and
        # valid keep the bookends `split` gives them.
        config.split_matrix = [*config.split_matrix[:2], None]
    train, valid, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [num_train, num_valid, 0], lambda: True, config
    ).build()
    return train, (valid if num_valid else None)


def _collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor | None]:
    batch = {key: torch.stack([s[key] for s in samples]) for key in samples[0]}
    batch.setdefault("attention_mask", None)
    return batch


def micro_batches(
    dataset,
    *,
    first_sample: int,
    global_batch_size: int,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
    device: torch.device,
) -> Iterator[dict[str, torch.Tensor | None]]:
    """This rank's micro-batches of the global batch that starts at sample `first_sample`."""
    step = micro_batch_size * dp_size
    for start in range(first_sample, first_sample + global_batch_size, step):
        lo = start + dp_rank * micro_batch_size
        batch = _collate([dataset[i % len(dataset)] for i in range(lo, lo + micro_batch_size)])
        yield {k: (v.to(device, non_blocking=True) if v is not None else None) for k, v in batch.items()}

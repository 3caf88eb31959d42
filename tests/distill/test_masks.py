"""Loss masks: next-token targets stop at document boundaries, padding and ignored labels, and KD
and CE count exactly the same positions."""

import pytest
import torch

from mixerswap.demo import build_tokenizer, demo_text
from mixerswap.distill.data import PackedLoader, PromptResponse
from mixerswap.distill.losses import chunked_kd_loss
from mixerswap.distill.masks import next_token_labels, prediction_mask, token_mask

I = -100


def tensors(**rows) -> dict:
    return {k: torch.tensor(v) for k, v in rows.items()}


def test_kd_and_ce_count_the_same_positions_for_ignored_prompt_labels():
    """The off-by-one this module fixes: a mask of the labelled tokens ([0, 0, 1, 1, 1]) is not the
    set of positions that predict them ([0, 1, 1, 1, 0])."""
    batch = tensors(input_ids=[[10, 11, 13, 14, 15]], labels=[[I, I, 13, 14, 15]])
    assert next_token_labels(batch).tolist() == [[I, 13, 14, 15, I]]
    assert prediction_mask(batch).tolist() == [[0, 1, 1, 1, 0]]
    assert token_mask(batch).tolist() == [[1, 1, 1, 1, 1]]  # hidden states of prompt tokens still count


def test_chunked_kd_loss_sees_one_set_of_positions():
    """KD and CE fed from the masks: a student equal to its teacher has zero KD, and its CE is the
    mean negative log-likelihood over exactly the positions the mask keeps."""
    torch.manual_seed(0)
    batch = tensors(input_ids=[[3, 4, 5, 6, 7, 1, 2]], labels=[[I, I, 5, 6, 7, I, 2]],
                    position_ids=[[0, 1, 2, 3, 4, 0, 1]])
    hidden = torch.randn(1, 7, 8)
    head = torch.nn.Linear(8, 9)
    mask, targets = prediction_mask(batch), next_token_labels(batch)
    loss = chunked_kd_loss(hidden, head, hidden, head, mask, ce_weight=1.0, labels=targets, chunk_tokens=2)
    keep = mask[0].bool()
    nll = torch.nn.functional.cross_entropy(head(hidden[0][keep]), targets[0][keep])
    torch.testing.assert_close(loss, nll)
    assert keep.tolist() == [False, True, True, True, False, True, False]


def test_packed_rows_do_not_predict_across_documents():
    batch = tensors(input_ids=[[1, 5, 6, 2, 1, 7, 2, 1], [8, 9, 2, 1, 5, 2, 1, 6]],
                    position_ids=[[0, 1, 2, 3, 0, 1, 2, 0], [0, 1, 2, 0, 1, 2, 0, 1]])
    assert next_token_labels(batch).tolist() == [[5, 6, 2, I, 7, 2, I, I], [9, 2, I, 5, 2, I, 6, I]]
    assert prediction_mask(batch).tolist() == [[1, 1, 1, 0, 1, 1, 0, 0], [1, 1, 0, 1, 1, 0, 1, 0]]
    assert token_mask(batch).tolist() == [[1.0] * 8] * 2


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_neither_predicts_nor_is_predicted(side):
    ids, mask = [5, 6, 7], [1, 1, 1]
    pad = lambda row, value: [value, value] + row if side == "left" else row + [value, value]  # noqa: E731
    batch = tensors(input_ids=[pad(ids, 0), [4, 5, 6, 7, 8]], attention_mask=[pad(mask, 0), [1] * 5])
    expected = pad([6, 7, I], I)
    assert next_token_labels(batch).tolist() == [expected, [5, 6, 7, 8, I]]
    assert prediction_mask(batch).tolist() == [[float(t != I) for t in expected], [1, 1, 1, 1, 0]]
    assert token_mask(batch).tolist() == [pad([1.0] * 3, 0.0), [1.0] * 5]


def test_left_padding_with_generate_style_positions():
    """transformers' generate gives pads position 1 and the first real token 0: same targets."""
    batch = tensors(input_ids=[[0, 0, 5, 6, 7]], attention_mask=[[0, 0, 1, 1, 1]], position_ids=[[1, 1, 0, 1, 2]],
                    labels=[[I, I, I, 6, 7]])
    assert next_token_labels(batch).tolist() == [[I, I, 6, 7, I]]


def test_without_labels_targets_are_the_next_input_ids():
    batch = tensors(input_ids=[[5, 6, 7, 8]])
    assert next_token_labels(batch).tolist() == [[6, 7, 8, I]]
    assert next_token_labels({**batch, "labels": None, "position_ids": None}).tolist() == [[6, 7, 8, I]]
    assert next_token_labels(batch).dtype == torch.long and prediction_mask(batch).dtype == torch.float32
    assert token_mask(batch).dtype == torch.float32


def test_loader_batches_predict_exactly_each_response_and_its_eos():
    tokenizer = build_tokenizer(demo_text())
    pairs = [PromptResponse("Once upon a time", " there was a cat."), PromptResponse("The end", ".")]
    expected, length = [], 0
    for pair in pairs:
        prompt, response = (tokenizer(text, add_special_tokens=False)["input_ids"] for text in pair)
        expected += [*response, tokenizer.eos_token_id]
        length += 1 + len(prompt) + len(response) + 1
    batch = next(iter(PackedLoader(pairs, tokenizer, seq_len=length, batch_size=1, shuffle=False)))
    targets = next_token_labels(batch)[0]
    assert targets[targets != I].tolist() == expected
    assert prediction_mask(batch).sum() == len(expected)

from types import SimpleNamespace

from mixerswap.generation import pad_token_id


def test_pad_token_id_falls_back_to_eos_only_when_there_is_no_pad():
    assert pad_token_id(SimpleNamespace(pad_token_id=0, eos_token_id=2)) == 0  # id 0 is a pad id, not "none"
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=2)) == 2
